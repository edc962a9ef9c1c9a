"""The adapter state of a model: which LoRA adapters it has, their configs, which are active, and the
modules that carry them (`LoraLayer` wrappers, `TrainableCopy` wrappers of `modules_to_save`).

The configs and the active set live in an `AdapterState` kept in the model's `__dict__` (not as a module
attribute, so it is neither a submodule nor part of `state_dict()`). This module owns where the state is
kept; `lorakit.inject` is what decides its contents.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from .config import LoraConfig
from .layers import LoraLayer
from .saved_module import TrainableCopy

_STATE_ATTR = "_lorakit"


@dataclass
class AdapterState:
    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def adapter_state(model: nn.Module) -> AdapterState | None:
    return model.__dict__.get(_STATE_ATTR)


def attach_state(model: nn.Module) -> AdapterState:
    """The model's state, created empty if it has none yet."""
    return model.__dict__.setdefault(_STATE_ATTR, AdapterState())


def detach_state(model: nn.Module) -> None:
    """Forget the model's adapter state (once its last adapter is gone)."""
    del model.__dict__[_STATE_ATTR]


def adapter_names(model: nn.Module) -> list[str]:
    state = adapter_state(model)
    return list(state.configs) if state else []


def active_adapters(model: nn.Module) -> list[str]:
    state = adapter_state(model)
    return list(state.active) if state else []


def require_adapters(model: nn.Module, names: list[str]) -> AdapterState:
    """The model's state, once every name in `names` is one of its adapters (KeyError listing the known names
    otherwise). With no names asked for, a model without adapters gives an empty state (not attached to it)."""
    state = adapter_state(model)
    known = list(state.configs) if state else []
    for name in names:
        if name not in known:
            raise KeyError(f"no adapter named {name!r}; adapters on this model: {known or 'none'}")
    return state if state is not None else AdapterState()


def adapter_config(model: nn.Module, name: str) -> LoraConfig:
    return require_adapters(model, [name]).configs[name]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def saved_copies(model: nn.Module) -> Iterator[tuple[str, TrainableCopy]]:
    for path, module in model.named_modules():
        if isinstance(module, TrainableCopy):
            yield path, module


__all__ = [
    "AdapterState",
    "active_adapters",
    "adapter_config",
    "adapter_names",
    "adapter_state",
    "attach_state",
    "detach_state",
    "lora_layers",
    "require_adapters",
    "saved_copies",
]
