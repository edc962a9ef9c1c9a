"""Merging adapters into the base weights and taking them out again: `merge`, `unmerge`, `merge_and_unload`.

What is guaranteed:

- `merge(model)` (reversible, the default) keeps an exact copy of each adapted layer's base tensors (the weight,
  its bias; a quantized layer's codes and scales) from its first merge until `unmerge`, which puts those bits
  back: merge then unmerge leaves W0 bit for bit as it was, on every layer type, quantized ones included. The
  cost is one copy of every adapted layer's base tensors, in their dtype and on their device, while merged.
- `merge(model, reversible=False)` keeps no copy; `unmerge` then subtracts the update again, which restores W0
  only up to float rounding (a few ulps; on a quantized base, a second re-quantization).
- The merged weight is W0 + ΔW rounded once to the weight's dtype (DoRA: f ⊙ (W0 + ΔW), see
  `lorakit.layers.variants`), so merged outputs equal unmerged ones up to that rounding, not bit for bit.
- `disable_adapters` inside a merge unmerges (exactly, after a reversible merge), so the block computes the
  base model's exact outputs, and merges again after it.
- `merge_and_unload` merges without keeping copies (the wrappers, and so W0, are dropped anyway).
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import dequantize
from .state import adapter_state, detach_state, lora_layers, require_adapters, saved_copies
from .targets import own_weight, weight_owners


def merged_names(model: nn.Module) -> list[str]:
    """The adapters merged into the base weights (in the order the layers report them)."""
    names: list[str] = []
    for _, layer in lora_layers(model):
        names += [n for n in layer.merged_adapters if n not in names]
    return names


def merge(model: nn.Module, names: list[str] | None = None, *, reversible: bool = True) -> None:
    """Fold scaling·B·A of the active adapters (or the given active ones) into the base weights. Reversible (the
    default): `unmerge` restores the base weights bit for bit, at the cost of a copy of them (module docstring)."""
    state = adapter_state(model)
    names = list(state.active) if state and names is None else list(names or [])
    state = require_adapters(model, names)
    if not names:
        raise RuntimeError("no active adapter to merge")
    inactive = [n for n in names if n not in state.active]
    if inactive:
        raise RuntimeError(f"adapters {inactive} are not active; merging them would change the model's outputs")
    already = [n for n in names if n in merged_names(model)]
    if already:
        raise RuntimeError(f"adapters {already} are already merged")
    _check_untied(model)
    for _, layer in lora_layers(model):
        layer.merge([n for n in names if n in layer.scaling], reversible=reversible)


def _check_untied(model: nn.Module) -> None:
    owners = weight_owners(model)
    for path, layer in lora_layers(model):
        sharing = [p for p in owners.get(id(own_weight(layer.base_layer)), []) if p != f"{path}.base_layer"]
        if sharing:
            raise RuntimeError(
                f"{path}'s weight is tied to {sharing}; merging would change those modules too. "
                "Untie the weights first, or run unmerged."
            )


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights again (bit for bit after a reversible merge)."""
    if not merged_names(model):
        raise RuntimeError("no adapter is merged")
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge the active adapters and remove every LoRA module: a plain model of the original class.

    On a quantized base (`lorakit.quantize`) the merged layers are re-quantized (adding rounding error, see
    `lorakit.quant.requantization_errors`) unless `dtype` is given: then every quantized layer is first
    decoded into a plain nn.Linear of that dtype, and the merge is exact in float.
    """
    state = adapter_state(model)
    if not state:
        raise RuntimeError("the model has no adapters")
    if dtype is not None:
        dequantize(model, dtype)
    # After a partial merge (`merge(model, ["a"])`) the other active adapters still have to go in.
    pending = [n for n in state.active if n not in merged_names(model)]
    if pending:
        merge(model, pending, reversible=False)  # W0 goes away with the wrappers: no copy to keep
    for path, layer in list(lora_layers(model)):
        model.set_submodule(path, layer.base_layer)
    for path, copy in list(saved_copies(model)):
        model.set_submodule(path, copy.unloaded())
    detach_state(model)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


__all__ = ["merge", "merge_and_unload", "merged_names", "unmerge"]
