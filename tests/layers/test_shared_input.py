"""LoRA layers fed one input (q, k, v) computing their down-projections together: outputs and gradients in
float64 against the composition written out with one shared dropout mask; the cases where members compute
alone (another input, another set-up, no gradients); the groups found in a Llama block."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.layers import LoraLinear, shared_input
from lorakit.layers.lora_function import keep_mask, keep_threshold
from lorakit.layers.shared_input import group_shared_inputs, ungroup_shared_inputs

P, SCALING = 0.25, 2.0  # alpha 8 over r 4


class Attention(nn.Module):
    """Three projections of one input, as in an attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 5), nn.Linear(8, 6), nn.Linear(8, 4)


def adapted(dropout: float = P) -> nn.Module:
    torch.manual_seed(0)
    block = nn.ModuleDict({"attn": Attention()}).double()
    lorakit.add_adapter(
        block, lorakit.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj"])
    )
    for layer in block.modules():
        if isinstance(layer, LoraLinear):
            nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero: give the update a value
    return block.train()


def members(block: nn.Module) -> list[LoraLinear]:
    attn = block["attn"]
    return [attn.q_proj, attn.k_proj, attn.v_proj]


def by_hand(block: nn.Module, x: torch.Tensor, seed: int, p: float) -> list[torch.Tensor]:
    """y_i = x W_iᵀ + b_i + s · (m ⊙ x / keep) A_iᵀ B_iᵀ, one mask m for all three layers."""
    dropped = x
    if p > 0:
        dropped = x * keep_mask(seed, x.shape, p, x.device).double() * keep_threshold(p)[1]
    outs = []
    for layer in members(block):
        base = layer.base_layer
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        outs.append(x @ base.weight.t() + base.bias + SCALING * (dropped @ a.t()) @ b.t())
    return outs


def seed_after(state: int) -> int:
    """The mask seed the grouped path draws first after torch.manual_seed(state)."""
    torch.manual_seed(state)
    return int(torch.randint(0, 2**62, (1,)).item())


def grads(outs: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    weights = torch.linspace(-1, 1, sum(o.numel() for o in outs), dtype=torch.float64)
    loss = (torch.cat([o.flatten() for o in outs]) * weights).sum()
    return list(torch.autograd.grad(loss, tensors))


def factors(block: nn.Module) -> list[torch.Tensor]:
    return [t for layer in members(block) for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]


@pytest.mark.parametrize("p", [0.0, P])
def test_grouped_outputs_and_gradients_equal_the_shared_mask_composition_in_float64(p):
    block = adapted(p)
    groups = group_shared_inputs(block)
    assert len(groups) == 1 and groups[0].members == [block["attn"].k_proj, block["attn"].q_proj, block["attn"].v_proj]
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    outs = [layer(x) for layer in members(block)]
    expected = by_hand(block, x, seed_after(3), p)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(outs, [x, *factors(block)]), grads(expected, [x, *factors(block)])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_group_computes_once_per_input_and_lets_it_go():
    block = adapted()
    (group,) = group_shared_inputs(block)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    q, k, v = members(block)
    q(x)
    assert group._pending is not None and group._pending.input is x
    k(x), v(x)
    assert group._pending is None  # every member took its columns: x is not held any more
    torch.manual_seed(5)
    first = q(x)
    torch.manual_seed(5)
    assert torch.equal(q(x), first)  # q again with the same x: computed anew from the same seed


def test_members_fed_different_inputs_dissolve_the_group_and_compute_alone():
    block, plain = adapted(0.0), adapted(0.0)
    (group,) = group_shared_inputs(block)
    x, y = torch.randn(2, 7, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    q, k, v = members(block)
    outs = [q(x), k(y), v(y)]  # cross-attention's pattern
    assert group.dissolved
    want = [plain["attn"].q_proj(x), plain["attn"].k_proj(y), plain["attn"].v_proj(y)]
    for got, expected in zip(outs, want):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change", ["two adapters", "merged", "disabled member", "no grad", "eval"])
def test_members_with_another_set_up_compute_alone(change):
    block, plain = adapted(0.0), adapted(0.0)
    (group,) = group_shared_inputs(block)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    for model in (block, plain):
        if change == "two adapters":
            lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="other")
            lorakit.set_adapter(model, ["default", "other"])
        elif change == "merged":
            lorakit.merge(model)
        elif change == "disabled member":
            model["attn"].v_proj.disabled = True
        elif change == "eval":
            model.eval()
    with torch.no_grad() if change == "no grad" else torch.enable_grad():
        shared = group.low_rank_output(block["attn"].q_proj, "default", x)
        assert (shared is None) == (change != "eval")  # in eval mode the group computes, with dropout 0
        outs = [layer(x) for layer in members(block)]
    for got, layer in zip(outs, members(plain)):
        torch.testing.assert_close(got, layer(x), rtol=1e-12, atol=1e-12)
    assert group._pending is None or change == "eval"


def test_a_llama_step_is_unchanged_by_grouping_without_dropout(chat_llama_dir, monkeypatch):
    """q, k, v and gate, up grouped in every block: same loss and gradients as ungrouped (no dropout, float64)."""
    models = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(chat_llama_dir).double()
        torch.manual_seed(1)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, dropout=0.0, target_modules="all-linear"), name="default")
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        models.append(model.train())
    groups = group_shared_inputs(models[0])
    assert len(groups) == 2 * models[0].config.num_hidden_layers
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    calls = []
    grouped_product = shared_input.lora_shared_product
    monkeypatch.setattr(shared_input, "lora_shared_product", lambda *args: calls.append(1) or grouped_product(*args))
    losses = [m(input_ids=ids, labels=ids).loss for m in models]
    assert len(calls) == len(groups) and not any(g.dissolved for g in groups)  # each group computed once
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for loss in losses:
        loss.backward()
    named = [dict(m.named_parameters()) for m in models]
    for name, param in named[0].items():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, named[1][name].grad, rtol=1e-10, atol=1e-12)
    ungroup_shared_inputs(groups)
    assert not any("input_group" in vars(m) for m in models[0].modules())
