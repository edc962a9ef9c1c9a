"""LoRA layers that read one tensor (an attention block's q, k and v projections) computing their
down-projections together in a training step.

q_proj, k_proj and v_proj receive the same hidden states x. Computed one by one, each adapter draws a dropout
mask over x, masks x and multiplies by its A; in the backward pass each regenerates its mask, masks its input
gradient, and autograd sums the three. Drawing and applying masks over x is most of what a LoRA layer adds
to a CPU training step. A group computes, at the first member's call,

    down = dropout(x) @ [A_q; A_k; A_v]ᵀ          (…, r_q + r_k + r_v)

with one mask and one product, and each member adds down[…, its columns] @ (s·Bᵀ) to its base output, all
of it one autograd function (`lora_function.LoraSharedProduct`) whose outputs the members take. The
three adapters share the mask, as they do when a model has one fused qkv projection (GPT-2's c_attn, Phi-3's
qkv_proj) that PEFT wraps: each adapter's input still sees dropout with probability p, but the three masks
are one draw rather than three. Gradients equal those of the ungrouped composition with that shared mask
(tested in float64).

Semantics of the cache: the first member called with a tensor x computes every member's output and keeps
(x, outputs) until each member has taken its own; a member called with another tensor (cross-attention, a
model that projects k and v from other states) dissolves the group, and every member computes alone from
then on. A member with another set-up (several active adapters, DoRA / PiSSA, merged, another rank or
dropout than the group's first) computes alone. Only gradient-recording calls use the group.

`group_shared_inputs(model)` sets up the groups (a plain attribute on each member: weights, state dicts,
saving and merging are untouched) and `ungroup_shared_inputs` removes them; the training loop does both
around training, as it does for its lean MLPs.

The opposite case is known too: layers that own their input (`INPUT_OWNERS`: no other module reads it and no
other operation keeps it for the backward pass). `mark_input_owners` tells them so, and their fused product
then saves its dropped-out input in place of x and reads the mask back from it (`lora_function.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import PLAIN, LoraLayer
from .linear import LoraLinear
from .lora_function import autocast_dtype, lora_shared_product

# Sibling modules that receive the same input in the architectures lorakit trains.
SHARED_INPUT_SIBLINGS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),  # Llama, Mistral, Qwen, SmolLM, OLMo, ...
    frozenset({"gate_proj", "up_proj"}),  # their gated MLPs
    frozenset({"query", "key", "value"}),  # BERT, RoBERTa
)
# Modules whose input is theirs alone: a gated MLP's output projection, whose input is the product
# act(gate)·up that neither factor's backward keeps. Not o_proj: its input is a view of the attention kernel's
# output, which that kernel saves (a dropped-out copy would add a hidden-state-sized tensor per layer).
INPUT_OWNERS = frozenset({"down_proj"})


@dataclass
class _Pending:
    """Low-rank outputs computed for `input`, waiting for the members that have not taken theirs."""

    input: torch.Tensor
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # id(member) -> its s·B·(columns of down)


class InputGroup:
    """LoRA layers called with one tensor, whose single active adapters compute their down-projections together."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self.dissolved = False
        self._pending: _Pending | None = None

    def _setup(self, layer: LoraLayer) -> tuple[str, int, float] | None:
        """(adapter name, rank, dropout p) of `layer`'s one active plain adapter, or None."""
        names = [n for n in layer.active_adapters if n not in layer.merged_adapters]
        if len(names) != 1 or layer.disabled or layer.variants.get(names[0]) is not PLAIN:
            return None
        dropout = layer.lora_dropout[names[0]]
        p = dropout.p if isinstance(dropout, nn.Dropout) and layer.training else 0.0
        return names[0], layer.rank[names[0]], p

    def _shared_dropout(self, name: str) -> float | None:
        """The dropout p of the members' common set-up when every member has the same one, for adapter `name`."""
        setups = [self._setup(m) for m in self.members]
        first = setups[0]
        return first[2] if first is not None and first[0] == name and all(s == first for s in setups) else None

    def low_rank_output(self, layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """s·B·(the member's columns of the shared down-projection of x), or None where `layer` must compute alone
        (see the module docstring). Computes the outputs of every member when x is new (or this member already
        took its output for x); a member still waiting for its output for another tensor dissolves the group:
        these layers are not fed one input."""
        if self.dissolved or not torch.is_grad_enabled():
            return None
        pending = self._pending
        if pending is None or pending.input is not x or id(layer) not in pending.outputs:
            if pending is not None and id(layer) in pending.outputs:
                self.dissolved, self._pending = True, None
                return None
            p = self._shared_dropout(name)
            if p is None:
                return None
            pending = self._pending = self._compute(name, x, p)
        output = pending.outputs.pop(id(layer))
        if not pending.outputs:
            self._pending = None  # every member has its output: let x go
        return output

    def _compute(self, name: str, x: torch.Tensor, p: float) -> _Pending:
        a_list = [m.lora_a_weight(name) for m in self.members]
        b_list = [m.lora_b_weight(name) for m in self.members]
        if autocast_dtype(x) is None:  # under autocast the products choose the dtype (x is saved uncopied)
            x = x.to(a_list[0].dtype)
        outputs = lora_shared_product(x, a_list, b_list, [m.scaling[name] for m in self.members], p)
        return _Pending(x, {id(m): out for m, out in zip(self.members, outputs)})


def group_shared_inputs(model: nn.Module) -> list[InputGroup]:
    """Group the LoRA layers of `model` that are siblings in `SHARED_INPUT_SIBLINGS` (two or more present);
    returns the groups made."""
    groups: list[InputGroup] = []
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUT_SIBLINGS:
            members = [m for n in sorted(names) if isinstance(m := children.get(n), LoraLinear)]
            members = [m for m in members if "input_group" not in vars(m)]
            if len(members) >= 2:
                group = InputGroup(members)
                for member in members:
                    vars(member)["input_group"] = group  # a plain attribute, not a submodule
                groups.append(group)
    return groups


def ungroup_shared_inputs(groups: list[InputGroup]) -> None:
    """Undo `group_shared_inputs`: every member computes alone again."""
    for group in groups:
        for member in group.members:
            vars(member).pop("input_group", None)
        group._pending = None


def mark_input_owners(model: nn.Module) -> list[LoraLinear]:
    """Mark the LoRA layers of `model` named in `INPUT_OWNERS` as owning their input; returns them."""
    owners = [
        module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in INPUT_OWNERS and isinstance(module, LoraLinear)
    ]
    for owner in owners:
        vars(owner)["owns_input"] = True  # a plain attribute, read by LoraLinear.low_rank_output
    return owners


def unmark_input_owners(owners: list[LoraLinear]) -> None:
    """Undo `mark_input_owners`."""
    for owner in owners:
        vars(owner).pop("owns_input", None)
