"""Putting adapters into a model and managing them: add / set / disable / delete, which parameters train,
and the planning of an injection (which modules an adapter wraps). Merging lives in `lorakit.merging`
(re-exported here).

The model keeps its own class: target modules are replaced in place by `LoraLayer` wrappers around the
original module, and `modules_to_save` by `TrainableCopy` wrappers. The adapters' configs and the active
set are the model's `AdapterState` (`lorakit.state`); the rules naming modules are `lorakit.targets`.
Every operation validates first and changes the model only once nothing can fail, so a bad call leaves
the model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .layers import LoraLayer, is_linear_layer, lora_class_for, supported_types
from .merging import merge, merge_and_unload, merged_names, unmerge
from .quant import QuantLinear
from .saved_module import TrainableCopy
from .state import (  # AdapterState, active_adapters, adapter_config: re-exported for `from lorakit.inject import`
    AdapterState,
    active_adapters,
    adapter_config,
    adapter_names,
    adapter_state,
    attach_state,
    detach_state,
    lora_layers,
    require_adapters,
    saved_copies,
)
from .targets import layer_index, name_matches, output_head


@dataclass
class InjectionPlan:
    """What adding an adapter will do, computed without touching the model."""

    layers: list[tuple[str, LoraLayer, bool]]  # path, wrapper, whether the wrapper is new
    saved: list[tuple[str, TrainableCopy, bool]]
    config: LoraConfig


# -- target matching ------------------------------------------------------------------------------
def _plain_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named modules of the base model; a wrapper counts as the module it wraps, its insides are skipped."""
    for child_name, child in model.named_children():
        path = f"{prefix}{child_name}"
        yield path, child
        if not isinstance(child, (LoraLayer, TrainableCopy)):
            yield from _plain_modules(child, f"{path}.")


def _is_module(module: nn.Module, other: nn.Module | None) -> bool:
    """Whether `module` is `other` or a LoRA wrapper around it. `other=None` (a model without an output head)
    matches nothing; comparing `getattr(..., None) is None` would instead match every plain layer."""
    return other is not None and (module is other or getattr(module, "base_layer", None) is other)


def _matching_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    modules = list(_plain_modules(model))
    saved_names = config.modules_to_save or []
    excluded = {p for p, _ in modules if config.exclude_modules and name_matches(config.exclude_modules, p)}
    excluded |= {p for p, _ in modules if saved_names and name_matches(saved_names, p)}
    if config.target_modules == ALL_LINEAR:
        head = output_head(model)
        by_name = [(p, m) for p, m in modules if is_linear_layer(m) and not _is_module(m, head)]
    else:
        spec = config.target_modules or []  # never None: LoraConfig refuses a config without targets
        by_name = [(p, m) for p, m in modules if name_matches(spec, p)]
        if isinstance(config.target_modules, list):
            unmatched = [t for t in config.target_modules if not any(name_matches([t], p) for p, _ in by_name)]
            if unmatched:
                raise ValueError(
                    f"target_modules {unmatched} match no module of {type(model).__name__}; "
                    f"adaptable module names are: {_adaptable_names(modules)}"
                )
    targets = [(p, m) for p, m in by_name if p not in excluded]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        targets = [(p, m) for p, m in targets if layer_index(p, config.layers_pattern) in wanted]
    if not targets:
        raise ValueError(
            f"target_modules {config.target_modules!r} (after exclusions and layers_to_transform) match no module "
            f"of {type(model).__name__}; adaptable module names are: {_adaptable_names(modules)}"
        )
    return targets


def _adaptable_names(modules: list[tuple[str, nn.Module]]) -> str:
    names = {p.rsplit(".", 1)[-1] for p, m in modules if isinstance(m, LoraLayer) or lora_class_for(m)}
    names = {n for n in names if not n.isdigit()}
    return ", ".join(sorted(names)) or "none"


# -- planning and applying ------------------------------------------------------------------------
def check_new_name(model: nn.Module, name: str) -> None:
    """Raise ValueError unless `name` can name a new adapter of `model`."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name in adapter_names(model):
        raise ValueError(
            f"an adapter named {name!r} already exists on this model; delete it first or pick another name"
        )


def plan_injection(
    model: nn.Module, config: LoraConfig, name: str, target_paths: list[str] | None = None
) -> InjectionPlan:
    """Validate everything adding adapter `name` needs and build the (not yet installed) wrappers.

    With `target_paths` (loading a file) the targets are exactly those paths, and `modules_to_save`
    entries that match nothing are skipped: PEFT lists generic head names ("classifier", "score").
    """
    check_new_name(model, name)
    if target_paths is None:
        targets = _matching_targets(model, config)
    else:
        modules = dict(_plain_modules(model))
        missing = [p for p in target_paths if p not in modules]
        if missing:
            raise ValueError(f"modules {missing[:5]} do not exist in {type(model).__name__}")
        targets = [(p, modules[p]) for p in target_paths]
    layers = [_planned_layer(path, module, config) for path, module in targets]
    saved = _planned_copies(model, config, strict=target_paths is None)
    transposed = any(w.fan_in_fan_out for _, w, _ in layers)
    return InjectionPlan(layers=layers, saved=saved, config=replace(config, fan_in_fan_out=transposed))


def _planned_layer(path: str, module: nn.Module, config: LoraConfig) -> tuple[str, LoraLayer, bool]:
    """The wrapper that will carry the adapter at `path` (the existing one, or a new one), checked."""
    is_new = not isinstance(module, LoraLayer)
    layer = module if isinstance(module, LoraLayer) else _new_wrapper(path, module)
    r = config.rank_for(path)
    if r > layer.max_rank():
        raise ValueError(f"r={r} for {path!r} exceeds min(in, out) = min({layer.in_features}, {layer.out_features})")
    try:
        layer.check_variant(config.init, config.use_dora)
    except ValueError as err:
        raise ValueError(f"module {path!r}: {err}") from None
    return path, layer, is_new


def _new_wrapper(path: str, module: nn.Module) -> LoraLayer:
    """The LoRA layer for the base module at `path` (TypeError when its type is not supported)."""
    lora_cls = lora_class_for(module)
    if lora_cls is None:
        raise TypeError(f"module {path!r} is a {type(module).__name__}; lorakit adapts {', '.join(supported_types())}")
    try:
        return lora_cls(module)
    except ValueError as err:
        raise ValueError(f"module {path!r}: {err}") from None


def _planned_copies(model: nn.Module, config: LoraConfig, strict: bool) -> list[tuple[str, TrainableCopy, bool]]:
    """The `modules_to_save` wrappers (existing or new); with `strict`, every entry must match a module."""
    saved: list[tuple[str, TrainableCopy, bool]] = []
    for wanted in config.modules_to_save or []:
        found = [(p, m) for p, m in _plain_modules(model) if name_matches([wanted], p)]
        if not found and strict:
            raise ValueError(
                f"modules_to_save entry {wanted!r} matches no module; top-level modules are: "
                f"{', '.join(n for n, _ in model.named_children())}"
            )
        for path, module in found:
            if isinstance(module, LoraLayer):
                raise ValueError(f"{path!r} is adapted with LoRA; it cannot also be in modules_to_save")
            if isinstance(module, TrainableCopy):
                saved.append((path, module, False))
            else:
                saved.append((path, TrainableCopy(module), True))
    return saved


def apply_plan(
    model: nn.Module, plan: InjectionPlan, name: str, activate: bool, *, autocast_adapter_dtype: bool = True
) -> None:
    """Install a plan from `plan_injection` as adapter `name` (nothing in here can fail on a valid plan)."""
    config = plan.config
    options = {"use_dora": config.use_dora, "autocast_adapter_dtype": autocast_adapter_dtype}
    for path, wrapper, is_new in plan.layers:
        wrapper.add_adapter(
            name, config.rank_for(path), config.scaling_for(path), config.dropout, config.init, **options
        )
        if is_new:
            model.set_submodule(path, wrapper)
    for path, copy, is_new in plan.saved:
        copy.add_adapter(name, autocast_adapter_dtype=autocast_adapter_dtype)
        if is_new:
            model.set_submodule(path, copy)
    state = attach_state(model)
    state.configs[name] = config
    _activate(model, [name] if activate or not state.active else state.active)


def _activate(model: nn.Module, names: list[str]) -> None:
    """Make `names` the active adapters and set exactly their parameters trainable."""
    state = require_adapters(model, names)
    state.active = list(names)
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.set_active(names)
    for _, copy in saved_copies(model):
        copy.set_active(names)
    bias_modes = {state.configs[n].bias for n in names}
    if "all" in bias_modes:
        # Biases inside modules_to_save wrappers are the copies' business (set_active above): the original
        # module must stay the base model's, and other adapters' copies must not train.
        in_copies = {id(p) for _, copy in saved_copies(model) for p in copy.parameters()}
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") and id(param) not in in_copies:
                param.requires_grad_(True)
    elif "lora_only" in bias_modes:
        for _, layer in lora_layers(model):
            if layer.bias is not None and set(layer.adapter_names) & set(names):
                layer.bias.requires_grad_(True)


# -- public operations ----------------------------------------------------------------------------
def add_adapter(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    activate: bool = True,
    *,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Add a LoRA adapter to `model` in place and return the model.

    Every base parameter is frozen; the new adapter's A/B (plus its `modules_to_save` copies and the
    biases its `bias` mode names) are trainable. With `activate` (the default) the new adapter becomes the
    only active one; otherwise the active set is kept (the first adapter is always activated).
    On a bf16 / fp16 base its trainable tensors are float32 (as in PEFT) unless `autocast_adapter_dtype=False`.
    """
    plan = plan_injection(model, config, name)
    if adapter_state(model) and any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise RuntimeError("the model has merged adapters; unmerge before adding another")
    apply_plan(model, plan, name, activate, autocast_adapter_dtype=autocast_adapter_dtype)
    return model


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Activate one adapter or several (their outputs add up); only active adapters train."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("set_adapter needs at least one adapter name (use disable_adapters for the base model)")
    require_adapters(model, names)
    if merged_names(model):
        raise RuntimeError(f"adapters {merged_names(model)} are merged; unmerge before switching adapters")
    _activate(model, names)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly the base model's outputs: merged adapters are undone first
    (bit for bit after a reversible merge, see `lorakit.merging`) and merged again after the block."""
    merged = merged_names(model)
    if merged:
        unmerge(model)
    wrappers = [m for m in model.modules() if isinstance(m, (LoraLayer, TrainableCopy))]
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for wrapper in wrappers:
            wrapper.disabled = False
        if merged:
            merge(model, merged)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter; layers left with no adapter go back to their original module."""
    state = require_adapters(model, [name])
    if name in merged_names(model):
        raise RuntimeError(f"adapter {name!r} is merged; unmerge before deleting it")
    for path, layer in list(lora_layers(model)):
        if name in layer.scaling:
            layer.delete_adapter(name)
            if not layer.adapter_names:
                model.set_submodule(path, layer.base_layer)
    for path, copy in list(saved_copies(model)):
        if name in copy.modules_to_save:
            copy.delete_adapter(name)
            if not copy.adapter_names:
                model.set_submodule(path, copy.original_module)
    del state.configs[name]
    if not state.configs:
        detach_state(model)
        for param in model.parameters():
            param.requires_grad_(True)
        return
    remaining = [n for n in state.active if n != name] or [next(iter(state.configs))]
    _activate(model, remaining)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters count once. A quantized weight (`lorakit.quantize`,
    stored in buffers) counts as its in × out parameters."""
    params = {id(p): p for p in model.parameters()}.values()
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


__all__ = [
    "AdapterState",
    "InjectionPlan",
    "active_adapters",
    "adapter_config",
    "adapter_names",
    "adapter_state",
    "add_adapter",
    "apply_plan",
    "check_new_name",
    "delete_adapter",
    "disable_adapters",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "merged_names",
    "plan_injection",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
]
