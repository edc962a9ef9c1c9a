"""The methods lorakit compares LoRA with (full, bitfit, adapter, prefix, prompt, head) as `FineTuningMethod`s.

Each is a module of this package with `OPTIONS` (the option names its folder records) and
`apply(model, options, state)`, plus `remove(model)` where it changes more than the `lorakit_` modules and
hooks it adds, and `added_positions(options)` where it lengthens the input. `BaselineMethod` gives every one
of them the same life cycle: applying freezes every base parameter, then the method makes its own trainable;
a classification head (`classifier` / `score`) is new and trains in full with every method, as with LoRA in
`lorakit train`. The state lives on the model (`MethodState`), the trained tensors in a method folder
(`files`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..inject import trainable_parameters
from ..state import adapter_names
from ..targets import head_names
from . import adapter, bitfit, full, head, prefix, prompt
from .base import (
    STATE_ATTR,
    MethodOptions,
    MethodState,
    described,
    method_state,
    refuse_second_method,
    remove_hooks,
    remove_modules,
)
from .files import check_fit, copy_in, method_tensors, read_folder, saved_options, write_folder


@dataclass(frozen=True)
class BaselineMethod:
    """A method of this package (see the module docstring), behind the `FineTuningMethod` protocol."""

    name: str
    implementation: ModuleType  # OPTIONS, apply(model, options, state) and optionally remove(model)
    mergeable: bool = False  # what trains is either the base weights themselves or modules beside them
    quantizable_base: bool = False  # `lorakit train --quantize` is QLoRA's

    def apply(self, model: nn.Module, options: MethodOptions) -> tuple[int, int]:
        options.validate()
        refuse_second_method(model)
        if adapter_names(model):
            raise ValueError(
                f"the model has LoRA adapters ({', '.join(adapter_names(model))}); methods do not combine with them"
            )
        state = MethodState(self.name, options, {n: p.requires_grad for n, p in model.named_parameters()})
        for param in model.parameters():
            param.requires_grad_(False)
        try:
            self.implementation.apply(model, options, state)
            for head_name in head_names(model):
                for param in getattr(model, head_name).parameters():
                    param.requires_grad_(True)
        except BaseException:
            self._undo(model, state)
            raise
        setattr(model, STATE_ATTR, state)
        return trainable_parameters(model)

    def added_positions(self, options: MethodOptions) -> int:
        return self.implementation.added_positions(options) if hasattr(self.implementation, "added_positions") else 0

    def describe(self, model: nn.Module) -> str:
        return described(f"method: {self.name}", trainable_parameters(model))

    def file_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}  # a tied parameter once

    def save(self, model: nn.Module, folder: str | os.PathLike, *, write: bool = True, **meta: Any) -> Path:
        state = self._state(model)
        tensors = method_tensors(model)  # every rank gathers (FSDP), whether it writes or not
        if not write:
            return Path(folder)
        config = {
            "method": self.name,
            "options": state.options.pick(self.implementation.OPTIONS),
            **{k: v for k, v in meta.items() if v is not None},
        }
        return write_folder(folder, tensors, config)

    def restore(self, model: nn.Module, folder: str | os.PathLike) -> None:
        config, tensors = read_folder(folder, self._expect)
        state = method_state(model)
        options = saved_options(config, folder)
        names = self.implementation.OPTIONS  # the file records the method's own options only
        if state is None or state.name != self.name or state.options.pick(names) != options.pick(names):
            raise ValueError(f"{folder} holds {self.name!r} with other options than the model's method")
        check_fit(model, tensors, folder)
        copy_in(model, tensors)

    def load(self, model: nn.Module, folder: str | os.PathLike) -> None:
        config, tensors = read_folder(folder, self._expect)
        self.apply(model, saved_options(config, folder))
        try:
            check_fit(model, tensors, folder)
        except ValueError:
            self.remove(model)
            raise
        copy_in(model, tensors)

    def merged(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        raise ValueError(f"the {self.name} method has nothing to merge into the base weights")

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[nn.Module]:
        state = self._state(model)
        previous, state.enabled = state.enabled, False
        try:
            yield model
        finally:
            state.enabled = previous

    def remove(self, model: nn.Module) -> None:
        self._undo(model, self._state(model))
        delattr(model, STATE_ATTR)

    # -- internals ---------------------------------------------------------------------------------
    def _state(self, model: nn.Module) -> MethodState:
        state = method_state(model)
        if state is None or state.name != self.name:
            applied = f"the {state.name!r} method" if state else "no method applied"
            raise ValueError(f"the model has {applied}, not {self.name!r}")
        return state

    def _expect(self, saved_name: str) -> None:
        if saved_name != self.name:
            raise ValueError(f"the folder holds the {saved_name!r} method, not {self.name!r}")

    def _undo(self, model: nn.Module, state: MethodState) -> None:
        remove_hooks(model)
        if hasattr(self.implementation, "remove"):
            self.implementation.remove(model)
        remove_modules(model)
        params = dict(model.named_parameters())
        for name, flag in state.requires_grad.items():
            params[name].requires_grad_(flag)


BASELINES: tuple[BaselineMethod, ...] = tuple(
    BaselineMethod(module.__name__.rsplit(".", 1)[1], module)
    for module in (full, bitfit, adapter, prefix, prompt, head)
)
