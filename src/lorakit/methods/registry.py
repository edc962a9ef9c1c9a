"""The one place that maps a method name to its `FineTuningMethod`, and the functions that act on whatever
method a model or a saved folder has.

LoRA (`lora.py`, PEFT-format folders) and the baselines (`baselines.py`, method folders) implement the same
protocol, so nothing here or in a caller asks which method it has; a saved folder says which it holds by
its files (`adapter_config.json` or `method_config.json`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..state import active_adapters, adapter_names
from .base import MethodOptions, method_state
from .baselines import BASELINES
from .files import is_method_folder, read_config, read_folder
from .lora import LoraMethod
from .protocol import FineTuningMethod

_LORA = LoraMethod()
_REGISTRY: dict[str, FineTuningMethod] = {_LORA.name: _LORA, **{method.name: method for method in BASELINES}}
METHODS: tuple[str, ...] = tuple(_REGISTRY)  # "lora" first


def get_method(name: str) -> FineTuningMethod:
    """The method registered as `name`; ValueError naming the known methods for any other name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}")
    return _REGISTRY[name]


def method_of(model: nn.Module, adapter: str | None = None) -> FineTuningMethod | None:
    """The method applied to `model` (LoRA when it has LoRA adapters), or None. For LoRA it works on the adapter
    named `adapter` when the model has it, else on "default", else on the first active adapter."""
    state = method_state(model)
    if state is not None:
        return get_method(state.name)
    names = adapter_names(model)
    if not names:
        return None
    if adapter in names:
        return LoraMethod(adapter=adapter)
    return _LORA if _LORA.adapter in names else LoraMethod(adapter=(active_adapters(model) or names)[0])


def saved_method(folder: str | os.PathLike) -> FineTuningMethod:
    """The method a saved folder holds: a method folder names it, any other folder is a LoRA adapter."""
    return get_method(str(read_config(folder).get("method"))) if is_method_folder(folder) else _LORA


def apply_method(model: nn.Module, name: str, options: MethodOptions | None = None) -> tuple[int, int]:
    """Apply method `name` to `model` in place: the method's parameters (and a classification head) train,
    everything else is frozen. LoRA reads its `LoraConfig` from `options.lora`. Returns (trainable, total)
    parameters. On error the model is unchanged."""
    return get_method(name).apply(model, options or MethodOptions())


def remove_method(model: nn.Module) -> None:
    """Take the method's modules and hooks out and restore every requires_grad flag. Weights the method
    trained in place (full, bitfit, head, adapter norms) keep their trained values."""
    method = method_of(model)
    if method is None:
        raise ValueError("the model has no method to remove")
    method.remove(model)


def method_name(model: nn.Module) -> str | None:
    """'lora' when the model has LoRA adapters, the applied method's name, or None."""
    method = method_of(model)
    return method.name if method else None


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base model's outputs: LoRA adapters off, adapter, prefix and
    prompt hooks stepping aside. Weights that a method trains in place (full, bitfit, head, adapter norms)
    have nothing to switch off: they are the base's until training changes them."""
    method = method_of(model)
    if method is None:
        yield model
        return
    with method.disabled(model):
        yield model


def save_method(model: nn.Module, path: str | os.PathLike, *, write: bool = True, **config_extra: Any) -> Path:
    """Write the applied method's trained tensors and config to the folder `path` (created if needed): a
    method folder, or PEFT's adapter format for LoRA. `config_extra` adds fields to the config (e.g.
    base_model_name_or_path, task_type). Under FSDP every rank must call this; pass `write=False` on all but one."""
    method = method_of(model)
    if method is None:
        raise ValueError("the model has no method applied")
    return method.save(model, path, write=write, **config_extra)


def read_method(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A method folder's config (validated) and tensors."""
    return read_folder(path, get_method)


def load_method(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Apply the method folder's method to `model` (a fresh base) and load its tensors. Returns the folder's config."""
    config = read_config(path)
    get_method(str(config.get("method"))).load(model, path)
    return config


def restore_method(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy a saved folder's values into the same method already applied to `model` (resuming a run)."""
    saved_method(path).restore(model, path)


def load_trained(model: nn.Module, folder: str | os.PathLike) -> FineTuningMethod:
    """Load any saved folder (a PEFT adapter folder or a method folder) onto `model`, a fresh base; returns
    the method it holds."""
    method = saved_method(folder)
    method.load(model, folder)
    return method
