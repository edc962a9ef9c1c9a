"""Mixed-adapter batches: every row of a batch runs through its own adapter, or through none.

    with lorakit.adapter_rows(model, ["sql", None, "e2e", "sql"]):
        logits = model(input_ids).logits   # rows 0 and 3 with "sql", row 1 the base model, row 2 with "e2e"

Each LoRA layer computes its frozen base output once for the whole batch; only the low-rank part is split
by adapter (the active adapters are ignored inside the block). Plain LoRA adapters on linear layers — no
DoRA, no PiSSA / OLoRA, no dropout in play — are *gathered*: their A and B are kept stacked per layer, every
row picks its own pair and two batched matmuls compute all the rows at once, however many adapters the batch
mixes. Every other adapter (and any adapter while gradients are recorded) runs as a *group*: the layer's own
`adapter_output` on the rows that use it. A batch that uses one adapter on every row runs exactly as
`set_adapter` would.

This module owns the per-layer plans and the stacked weights; `LoraLayer.forward` calls `apply` on the plan
set on it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import WEIGHT_INITS
from .layers import LoraLayer, is_linear_layer
from .state import adapter_config, adapter_names, adapter_state, lora_layers

ROWS_ATTR = "row_adapters"  # the attribute of a LoraLayer that LoraLayer.forward looks for


@dataclass
class _Stack:
    """The plain adapters of one layer, stacked for gathering. Slot 0 is all zeros (rows without an adapter);
    ranks below the largest are zero-padded, which adds exact zeros."""

    key: tuple  # what the stack was built from (see `_stack_key`)
    tensors: tuple[torch.Tensor, ...]  # the A and B tensors stacked, to notice in-place changes (_version)
    versions: tuple[int, ...]
    slot: dict[str, int]
    a_t: torch.Tensor  # (slots, in, r_max): Aᵀ of each adapter
    b_t: torch.Tensor  # (slots, r_max, out): Bᵀ
    scale: torch.Tensor  # (slots,)


# Per-layer stacks. A stack is rebuilt when the layer's adapters change (added, deleted, re-created: the
# container entries are other objects) or one of its tensors is modified in place (its _version moves). The
# stack holds the objects it was built from, so a freed object's id cannot be reused while it is cached.
_stacks: weakref.WeakKeyDictionary[LoraLayer, _Stack] = weakref.WeakKeyDictionary()


def _stack_key(layer: LoraLayer) -> tuple:
    containers = tuple(tuple(getattr(layer, c).values()) for c in layer.adapter_containers)
    return containers, tuple(layer.scaling.items()), layer.training


def _stack_for(layer: LoraLayer, eligible: dict[str, bool]) -> _Stack | None:
    """The stack of the layer's gatherable adapters (`eligible`: name -> whether it has dropout), or None."""
    key = _stack_key(layer)
    cached = _stacks.get(layer)
    if cached is not None and cached.key == key and cached.versions == tuple(t._version for t in cached.tensors):
        return cached
    names = [n for n in layer.adapter_names if n in eligible and not (eligible[n] and layer.training)]
    if not names:
        return None
    pairs = [(layer.lora_a_weight(n), layer.lora_b_weight(n)) for n in names]
    a0 = pairs[0][0]
    r_max = max(a.shape[0] for a, _ in pairs)
    a_t = torch.zeros(len(names) + 1, layer.in_features, r_max, dtype=a0.dtype, device=a0.device)
    b_t = torch.zeros(len(names) + 1, r_max, layer.out_features, dtype=a0.dtype, device=a0.device)
    with torch.no_grad():
        for i, (a, b) in enumerate(pairs, start=1):
            a_t[i, :, : a.shape[0]] = a.T
            b_t[i, : b.shape[1], :] = b.T
    scale = torch.tensor([0.0] + [layer.scaling[n] for n in names], dtype=a0.dtype, device=a0.device)
    tensors = tuple(t for pair in pairs for t in pair)
    stack = _Stack(
        key, tensors, tuple(t._version for t in tensors), {n: i for i, n in enumerate(names, start=1)}, a_t, b_t, scale
    )
    _stacks[layer] = stack
    return stack


class RowPlan:
    """What one layer adds to its base output for a mixed batch: gathered plain adapters, then groups."""

    def __init__(
        self,
        batch: int,
        whole: str | None,
        groups: list[tuple[str, torch.Tensor]],
        stack: _Stack | None,
        slots: torch.Tensor | None,
    ) -> None:
        self.batch = batch
        self.whole = whole  # the one adapter every row uses, when that is the case
        self.groups = groups
        self.stack = stack
        self.slots = slots

    def apply(self, layer: LoraLayer, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.batch:
            raise ValueError(
                f"adapter_rows was given {self.batch} row adapters but a layer received a batch of {x.shape[0]} rows"
            )
        if self.whole is not None:
            return base_out + layer.adapter_output(self.whole, x, base_out).to(base_out.dtype)
        result = base_out
        if self.stack is not None:
            a_t, b_t = self.stack.a_t[self.slots], self.stack.b_t[self.slots]
            flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_t.dtype)
            delta = torch.bmm(torch.bmm(flat, a_t), b_t) * self.stack.scale[self.slots].view(-1, 1, 1)
            result = result + delta.reshape(base_out.shape).to(result.dtype)
        if self.groups:
            result = result.clone() if result is base_out else result
            for name, rows in self.groups:
                out = layer.adapter_output(name, x.index_select(0, rows), base_out.index_select(0, rows))
                result.index_add_(0, rows, out.to(result.dtype))
        return result


def _check_names(model: nn.Module, names: list[str | None]) -> None:
    if not names:
        raise ValueError("adapter_rows needs one entry per batch row (an adapter name, or None for the base model)")
    known = adapter_names(model)
    for name in dict.fromkeys(n for n in names if n is not None):
        if not isinstance(name, str) or name not in known:
            raise KeyError(f"no adapter named {name!r}; adapters on this model: {known or 'none'}")
        config = adapter_config(model, name)
        if config.modules_to_save or config.bias != "none":
            raise ValueError(
                f"adapter {name!r} changes more than its low-rank matrices (modules_to_save or trained biases are "
                "shared by every row of a batch); it cannot share a batch with other adapters"
            )


def _eligible(model: nn.Module) -> dict[str, bool]:
    """Adapters that add exactly scaling·B·A·x on a linear layer (no DoRA, no PiSSA / OLoRA residual), each with
    whether it has dropout (then it is gathered only while the layer is in eval mode)."""
    eligible = {}
    for name in adapter_names(model):
        config = adapter_config(model, name)
        if not config.use_dora and config.init not in WEIGHT_INITS:
            eligible[name] = config.dropout > 0
    return eligible


def _plan(
    layer: LoraLayer, batch: int, rows_of: dict[str, torch.Tensor], eligible: dict[str, bool], slot_cache: dict
) -> RowPlan:
    present = [n for n in rows_of if n in layer.scaling]
    if len(present) == 1 and len(rows_of[present[0]]) == batch:
        return RowPlan(batch, present[0], [], None, None)
    stack = None
    # Gathering pays off from two adapters on; recorded gradients need each adapter's own forward.
    if len(present) >= 2 and is_linear_layer(layer) and not torch.is_grad_enabled():
        stack = _stack_for(layer, eligible)
    gathered = [n for n in present if stack is not None and n in stack.slot]
    if len(gathered) < 2:
        gathered, stack = [], None
    groups = [(n, rows_of[n]) for n in present if n not in gathered]
    slots = None
    if stack is not None:
        key = (id(stack), tuple(gathered))
        slots = slot_cache.get(key)
        if slots is None:
            slots = torch.zeros(batch, dtype=torch.long, device=stack.a_t.device)
            for name in gathered:
                slots[rows_of[name]] = stack.slot[name]
            slot_cache[key] = slots
    return RowPlan(batch, None, groups, stack, slots)


@dataclass
class _ModelCache:
    """A model's LoRA layers and its recent plans, valid while the same adapter configs are on the model (adding,
    loading or deleting an adapter creates or drops config objects; layers change only then)."""

    configs: tuple
    layers: list[LoraLayer]
    plans: dict[tuple, list[RowPlan]] = field(default_factory=dict)  # by (row names, grad mode, training flags)


# Looking up the layers (a walk over every module) and planning each layer cost more than a decode step's
# low-rank work on a real model; a generation loop asks for the same rows step after step.
_models: weakref.WeakKeyDictionary[nn.Module, _ModelCache] = weakref.WeakKeyDictionary()
_MAX_PLANS = 64


def _model_cache(model: nn.Module) -> _ModelCache:
    state = adapter_state(model)
    configs = tuple(state.configs.items()) if state else ()
    cached = _models.get(model)
    if (
        cached is None
        or len(cached.configs) != len(configs)
        or any(a[0] != b[0] or a[1] is not b[1] for a, b in zip(cached.configs, configs))
    ):
        cached = _ModelCache(configs, [layer for _, layer in lora_layers(model)])
        _models[model] = cached
    return cached


def _still_valid(plans: list[RowPlan]) -> bool:
    """Whether no stacked adapter tensor was modified in place since the plans were made."""
    stacks = {id(plan.stack): plan.stack for plan in plans if plan.stack is not None}
    return all(stack.versions == tuple(t._version for t in stack.tensors) for stack in stacks.values())


def _plans(model: nn.Module, cache: _ModelCache, names: list[str | None]) -> list[RowPlan]:
    key = (tuple(names), torch.is_grad_enabled(), tuple(layer.training for layer in cache.layers))
    plans = cache.plans.get(key)
    if plans is not None and _still_valid(plans):
        return plans
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None:
            rows.setdefault(name, []).append(i)
    rows_of = {n: torch.tensor(indices, device=device) for n, indices in rows.items()}
    eligible = _eligible(model)
    slot_cache: dict = {}  # layers with the same stacked adapters share one slot tensor
    plans = [_plan(layer, len(names), rows_of, eligible, slot_cache) for layer in cache.layers]
    if len(cache.plans) >= _MAX_PLANS:
        cache.plans.clear()
    cache.plans[key] = plans
    return plans


@contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch the model sees uses adapter `names[i]` (None: the base model).

    The batch is the first dimension of the layers' inputs, so `len(names)` must equal the batch size. Adapters
    with `modules_to_save` or trained biases are refused (those modules are shared by the rows); merged
    adapters too (merged weights would apply to every row).
    """
    names = list(names)
    _check_names(model, names)
    cache = _model_cache(model)
    layers = cache.layers
    merged = sorted({n for layer in layers for n in layer.merged_adapters})
    if merged:
        raise RuntimeError(f"adapters {merged} are merged; unmerge before running a mixed-adapter batch")
    if any(layer.__dict__.get(ROWS_ATTR) is not None for layer in layers):
        raise RuntimeError("adapter_rows is already in effect on this model; blocks cannot be nested")
    plans = _plans(model, cache, names)
    try:
        for layer, plan in zip(layers, plans):
            layer.__dict__[ROWS_ATTR] = plan
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop(ROWS_ATTR, None)
