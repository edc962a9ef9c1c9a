"""`TrainableCopy`: a module trained in full beside an adapter (`LoraConfig.modules_to_save`).

Typical use is a new classification head. Each adapter gets its own copy of the original module, so
switching adapters switches heads too; the original stays untouched for the base model. The attribute
names (`original_module`, `modules_to_save`) are PEFT's, which keeps state-dict paths familiar.

Over a bf16 / fp16 original the copies' parameters are float32 master weights (unless the adapter is added
with `autocast_adapter_dtype=False`). Such a copy takes its floating-point inputs in float32 and returns its
output in the original's dtype when autocast is off; under autocast the ops pick their dtype themselves.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .layers import adapter_dtype


class TrainableCopy(nn.Module):
    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.upcast: set[str] = set()  # copies whose parameters were made float32 masters

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def base_dtype(self) -> torch.dtype | None:
        """The dtype of the original module's floating-point parameters (None when it has none)."""
        return next((p.dtype for p in self.original_module.parameters() if p.is_floating_point()), None)

    def add_adapter(self, name: str, *, autocast_adapter_dtype: bool = True) -> None:
        clone = copy.deepcopy(self.original_module)
        base_dtype = self.base_dtype()
        if base_dtype is not None and adapter_dtype(base_dtype, autocast_adapter_dtype) != base_dtype:
            for param in clone.parameters():
                if param.is_floating_point():
                    param.data = param.data.to(torch.float32)
            self.upcast.add(name)
        self.modules_to_save[name] = clone

    def unloaded(self) -> nn.Module:
        """The module in use, for a model without wrappers: a float32 master copy is cast back to the original's
        dtype (in place: it is meant to replace this wrapper)."""
        module = self.current()
        base_dtype = self.base_dtype()
        if self.active_adapter in self.upcast and module is not self.original_module and base_dtype is not None:
            for param in module.parameters():
                if param.is_floating_point():
                    param.data = param.data.to(base_dtype)
        return module

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.upcast.discard(name)
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, names: list[str]) -> None:
        # Two heads cannot both answer; the first active adapter that owns a copy wins.
        owners = [n for n in names if n in self.modules_to_save]
        self.active_adapter = owners[0] if owners else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_adapter)

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        module = self.current()
        if module is self.original_module or self.active_adapter not in self.upcast:
            return module(*args, **kwargs)
        device_type = next(module.parameters()).device.type
        if device_type != "meta" and torch.is_autocast_enabled(device_type):
            return _cast(module(*args, **kwargs), self.base_dtype())
        args = tuple(_cast(a, torch.float32) for a in args)
        kwargs = {k: _cast(v, torch.float32) for k, v in kwargs.items()}
        return _cast(module(*args, **kwargs), self.base_dtype())

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code reads attributes of its head (e.g. `classifier.out_features`): answer for the copy
            # in use. Dunder and own names are never forwarded, so copying/pickling a half-built object works.
            own = ("original_module", "modules_to_save", "active_adapter", "disabled", "upcast")
            if name.startswith("__") or name in own:
                raise
            return getattr(self.current(), name)


def _cast(value: Any, dtype: torch.dtype | None) -> Any:
    """`value` in `dtype` when it is a floating-point tensor (anything else as it is)."""
    if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value
