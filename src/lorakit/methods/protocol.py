"""`FineTuningMethod`: what every fine-tuning method offers, LoRA and the baselines alike.

Callers (training, estimation, the command line) hold a method object from the registry
(`lorakit.methods.get_method(name)`, `method_of(model)`) and use only these members, so that no caller
asks which method it has.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .base import MethodOptions


@runtime_checkable
class FineTuningMethod(Protocol):
    """One way of fine-tuning a model: what it adds to the model, what trains, and how it is saved.

    Members:
        name: the registry's name of the method ("lora", "full", "adapter", ...), also the name a saved
            folder records.
        mergeable: the trained change can be folded into the base weights (`merged`), after which the model
            runs as fast as the base.
        quantizable_base: the method trains on a base whose linear layers `lorakit.quantize` froze into
            4/8-bit codes (QLoRA); `lorakit train --quantize` accepts only such methods.
        apply(model, options): apply the method to `model` in place, reading its own fields of `options`:
            its parameters (and a classification head, which is new) train, every other parameter is
            frozen. Returns (trainable, total) parameters. On error the model is unchanged.
        added_positions(options): positions the method puts in front of every input inside the model
            (prompt tuning's soft prompt), 0 for most methods.
        describe(model): one log line saying what is applied and how many parameters train.
        file_tensors(model): what `save` writes, by file key: the model's own tensors, not copies (so a model
            on the meta device gives the file's size without data).
        save(model, folder, *, write=True, **meta): write the trained tensors and the method's config to
            `folder` (PEFT's adapter format for LoRA, a method folder otherwise); `meta` adds fields such
            as base_model_name_or_path and task_type. Under FSDP every rank calls it, with `write=False`
            on all but one. Returns the folder.
        restore(model, folder): put a saved folder's values into the method already applied to `model`
            (resuming a run). The baselines copy them into the same parameters and refuse a folder of another
            method or other options; LoRA replaces its adapter by the folder's (new parameters: build the
            optimizer after restoring).
        load(model, folder): apply the saved method to `model`, a fresh base, and load its values; on
            error the model is unchanged.
        merged(model): a context manager within which the trained change is folded into the base weights
            (mergeable methods only; others raise ValueError).
        disabled(model): a context manager within which the model computes the base model's outputs.
            Weights a method trains in place (full, bitfit, head, adapter norms, and the baselines'
            classification head) have nothing to switch off; LoRA's trained copy of a head is switched off.
        remove(model): take the method off again: its modules and hooks go, and every parameter gets back
            the requires_grad flag it had before `apply`. Weights trained in place keep their values.
    """

    @property
    def name(self) -> str: ...

    @property
    def mergeable(self) -> bool: ...

    @property
    def quantizable_base(self) -> bool: ...

    def apply(self, model: nn.Module, options: MethodOptions) -> tuple[int, int]: ...

    def added_positions(self, options: MethodOptions) -> int: ...

    def describe(self, model: nn.Module) -> str: ...

    def file_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]: ...

    def save(self, model: nn.Module, folder: str | os.PathLike, *, write: bool = True, **meta: Any) -> Path: ...

    def restore(self, model: nn.Module, folder: str | os.PathLike) -> None: ...

    def load(self, model: nn.Module, folder: str | os.PathLike) -> None: ...

    def merged(self, model: nn.Module) -> AbstractContextManager[nn.Module]: ...

    def disabled(self, model: nn.Module) -> AbstractContextManager[nn.Module]: ...

    def remove(self, model: nn.Module) -> None: ...
