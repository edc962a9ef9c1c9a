"""Merge then unmerge gives the base weights back bit for bit (fp32, bf16, DoRA, PiSSA), `disable_adapters`
inside a merge computes exactly the base model, the training recipe's merged latency timing leaves the
user's base untouched, and the memory a reversible merge keeps is one copy of the adapted base tensors."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.inject import lora_layers, merged_names
from lorakit.methods import method_of
from lorakit.train.recipe import method_latency
from support.models import make_llama, randomize_lora


def _adapted(dtype: torch.dtype, **config) -> torch.nn.Module:
    model = make_llama().to(dtype)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", **config))
    randomize_lora(model, std=0.05)
    return model


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise_equal(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"changed: {changed[:3]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", [{}, {"use_dora": True}, {"init": "pissa"}], ids=["plain", "dora", "pissa"])
def test_merge_then_unmerge_restores_every_bit(dtype, config, input_ids):
    model = _adapted(dtype, **config)
    before, outputs = _weights(model), model(input_ids).logits
    lorakit.merge(model)
    merged = _weights(model)
    assert any(not torch.equal(merged[k], before[k]) for k in before)  # the merge did change the base
    lorakit.unmerge(model)
    _assert_bitwise_equal(_weights(model), before)
    assert torch.equal(model(input_ids).logits, outputs)


def test_irreversible_merge_keeps_no_copy_and_unmerges_only_up_to_rounding(input_ids):
    model = _adapted(torch.float32)
    before = _weights(model)
    lorakit.merge(model, reversible=False)
    assert all(layer.unmerged_state is None for _, layer in lora_layers(model))
    lorakit.unmerge(model)
    after = _weights(model)
    rounded = [k for k in before if not torch.equal(after[k], before[k])]
    assert rounded  # float32 subtraction does not give W0 back exactly: why reversible merges keep a copy
    for key in rounded:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)


def test_disable_adapters_while_merged_is_exactly_the_base_model(input_ids):
    model = _adapted(torch.bfloat16)
    base = make_llama().to(torch.bfloat16)
    lorakit.merge(model)
    with lorakit.disable_adapters(model):
        assert torch.equal(model(input_ids).logits, base(input_ids).logits)
    assert merged_names(model) == ["default"]


def test_reversible_merge_keeps_one_copy_of_the_adapted_base_tensors():
    model = _adapted(torch.bfloat16)
    adapted = {path: layer.base_layer for path, layer in lora_layers(model)}
    expected = sum(t.numel() * t.element_size() for base in adapted.values() for t in base.state_dict().values())
    lorakit.merge(model)
    kept = sum(
        t.numel() * t.element_size() for _, layer in lora_layers(model) for t in (layer.unmerged_state or {}).values()
    )
    assert kept == expected
    lorakit.unmerge(model)
    assert all(layer.unmerged_state is None for _, layer in lora_layers(model))


def test_training_latency_timing_leaves_the_base_unchanged(input_ids):
    model = _adapted(torch.float32)
    before = _weights(model)
    latency = method_latency(model, method_of(model), {"input_ids": input_ids})
    assert set(latency) == {"lora", "lora_merged"}
    _assert_bitwise_equal(_weights(model), before)
    assert merged_names(model) == []
