"""The one place that maps a method name to its implementation, and applies, switches off and removes
methods.

`lora` is lorakit's own path (`lorakit.add_adapter`, PEFT-format files); every other method is a module of
this package with `OPTIONS` (the option names its file records) and `apply(model, options, state)`, plus
`remove(model)` where it changes more than the `lorakit_` modules and hooks it adds. Applying freezes
every base parameter, then the method makes its own trainable; a classification head (`classifier` /
`score`) is new and trains in full with every method, as with LoRA in `lorakit train`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from torch import nn

from ..inject import adapter_names, disable_adapters, trainable_parameters
from . import adapter, bitfit, full, head, prefix, prompt
from .base import STATE_ATTR, MethodOptions, MethodState, head_names, method_state, remove_hooks, remove_modules

IMPLEMENTATIONS: dict[str, ModuleType] = {
    "full": full, "bitfit": bitfit, "adapter": adapter, "prefix": prefix, "prompt": prompt, "head": head,
}
METHODS = ("lora", *IMPLEMENTATIONS)


def implementation(name: str) -> ModuleType:
    if name == "lora":
        raise ValueError("lora is applied with lorakit.add_adapter(model, LoraConfig(...)) and saved in PEFT's format")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}")
    return IMPLEMENTATIONS[name]


def apply_method(model: nn.Module, name: str, options: MethodOptions | None = None) -> tuple[int, int]:
    """Apply method `name` to `model` in place: the method's parameters (and a classification head) train,
    everything else is frozen. Returns (trainable, total) parameters. On error the model is unchanged."""
    impl = implementation(name)
    options = options or MethodOptions()
    options.validate()
    existing = method_state(model)
    if existing is not None:
        raise ValueError(f"the model already has the {existing.name!r} method; remove it first (remove_method)")
    if adapter_names(model):
        raise ValueError(f"the model has LoRA adapters ({', '.join(adapter_names(model))}); "
                         "methods do not combine with them")
    state = MethodState(name, options, {n: p.requires_grad for n, p in model.named_parameters()})
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        impl.apply(model, options, state)
        for head_name in head_names(model):
            for param in getattr(model, head_name).parameters():
                param.requires_grad_(True)
    except BaseException:
        _undo(model, impl, state)
        raise
    setattr(model, STATE_ATTR, state)
    return trainable_parameters(model)


def _undo(model: nn.Module, impl: ModuleType, state: MethodState) -> None:
    remove_hooks(model)
    if hasattr(impl, "remove"):
        impl.remove(model)
    remove_modules(model)
    params = dict(model.named_parameters())
    for name, flag in state.requires_grad.items():
        params[name].requires_grad_(flag)


def remove_method(model: nn.Module) -> None:
    """Take the method's modules and hooks out and restore every requires_grad flag. Weights the method
    trained in place (full, bitfit, head, adapter norms) keep their trained values."""
    state = method_state(model)
    if state is None:
        raise ValueError("the model has no method to remove")
    _undo(model, IMPLEMENTATIONS[state.name], state)
    delattr(model, STATE_ATTR)


def method_name(model: nn.Module) -> str | None:
    """'lora' when the model has LoRA adapters, the applied method's name, or None."""
    state = method_state(model)
    return state.name if state else ("lora" if adapter_names(model) else None)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base model's outputs: LoRA adapters off, adapter, prefix and
    prompt hooks stepping aside. Weights that a method trains in place (full, bitfit, head, adapter norms)
    have nothing to switch off: they are the base's until training changes them."""
    state = method_state(model)
    if state is None:
        with disable_adapters(model):
            yield model
        return
    previous, state.enabled = state.enabled, False
    try:
        yield model
    finally:
        state.enabled = previous
