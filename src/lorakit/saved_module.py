"""`TrainableCopy`: a module trained in full beside an adapter (`LoraConfig.modules_to_save`).

Typical use is a new classification head. Each adapter gets its own copy of the original module, so
switching adapters switches heads too; the original stays untouched for the base model. The attribute
names (`original_module`, `modules_to_save`) are PEFT's, which keeps state-dict paths familiar.
"""

from __future__ import annotations

import copy

from torch import nn


class TrainableCopy(nn.Module):
    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
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
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code reads attributes of its head (e.g. `classifier.out_features`): answer for the copy
            # in use. Dunder and own names are never forwarded, so copying/pickling a half-built object works.
            if name.startswith("__") or name in ("original_module", "modules_to_save", "active_adapter", "disabled"):
                raise
            return getattr(self.current(), name)
