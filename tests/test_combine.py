"""Adapter arithmetic (`lorakit.combine`, `lorakit combine`): cat is exactly the weighted sum of the updates,
svd the best rank-k approximation of it, linear PEFT's factor-wise mix, ties the TIES formula written out
here; PEFT's `add_weighted_adapter` gives the same outputs; the result saves in PEFT's format; heads, DoRA
and bad input are handled."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel
from torch import nn
from typer.testing import CliRunner

import lorakit
from lorakit import LoraConfig
from lorakit.inject import lora_layers
from lorakit.models import load_model
from support.files import save_tiny_llama
from support.models import Holder, randomize_lora


def _two_adapters(model: nn.Module, configs: dict[str, LoraConfig]) -> nn.Module:
    for name, config in configs.items():
        lorakit.add_adapter(model, config, name)
    randomize_lora(model, std=0.3)
    return model


LLAMA = {
    "a": LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "b": LoraConfig(r=3, alpha=5, target_modules=["v_proj", "o_proj"], init="pissa"),
}


def _weighted_delta(layer, weights: dict[str, float]) -> torch.Tensor:
    return sum(w * layer.delta_weight(n).double() for n, w in weights.items() if n in layer.scaling)


def _folded(base: nn.Module, model: nn.Module, weights: dict[str, float]) -> nn.Module:
    """The base model with W0 + Σ w_i·ΔW_i written into its weights (the deltas summed in float64)."""
    params = dict(base.named_parameters())
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if any(n in layer.scaling for n in weights):
                weight = params[f"{path}.weight"]
                weight.copy_(weight.double() + _weighted_delta(layer, weights))
    return base


def test_cat_is_exactly_the_weighted_sum(base_copy, input_ids):
    model = _two_adapters(base_copy("llama"), LLAMA)
    weights = {"a": 0.7, "b": -0.3}
    lorakit.combine(model, weights, method="cat", name="mix", activate=True)
    for _, layer in lora_layers(model):
        torch.testing.assert_close(
            layer.delta_weight("mix").double(), _weighted_delta(layer, weights), rtol=0, atol=1e-6
        )
    expected = _folded(base_copy("llama"), model, weights)(input_ids).logits
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=1e-5)
    # Weights 1 and 1: the same function as both adapters active at once.
    lorakit.combine(model, {"a": 1, "b": 1}, method="cat", name="both")
    lorakit.set_adapter(model, ["a", "b"])
    together = model(input_ids).logits
    lorakit.set_adapter(model, "both")
    torch.testing.assert_close(model(input_ids).logits, together, rtol=0, atol=1e-5)
    config = lorakit.adapter_config(model, "both")
    assert config.r == 8 and config.rank_pattern[r"model\.embed_tokens"] == 2  # 2 + (3 + 3 for PiSSA's B0·A0)


@pytest.mark.parametrize(
    ("base_name", "targets"), [("gpt2", ["c_attn", "c_fc"]), ("convnet", ["conv1", "conv2", "head"])]
)
def test_cat_on_conv1d_and_conv2d(base_name, targets, base_copy, input_ids, images):
    model = _two_adapters(
        base_copy(base_name),
        {
            "a": LoraConfig(r=2, alpha=3, target_modules=targets),
            "b": LoraConfig(r=1, alpha=2, target_modules=targets[:2]),
        },
    )
    weights = {"a": 1.5, "b": 0.5}
    lorakit.combine(model, weights, method="cat", name="mix", activate=True)
    x = images if base_name == "convnet" else input_ids
    out = model(x)
    expected = _folded(base_copy(base_name), model, weights)(x)
    torch.testing.assert_close(getattr(out, "logits", out), getattr(expected, "logits", expected), rtol=0, atol=1e-5)


def test_cat_beyond_the_layer_rank_stays_exact():
    torch.manual_seed(0)
    holder = Holder(nn.Linear(4, 4))
    for name in "abc":
        lorakit.add_adapter(holder, LoraConfig(r=2, target_modules=["layer"]), name)
    randomize_lora(holder)
    weights = {"a": 1.0, "b": -2.0, "c": 0.5}
    lorakit.combine(holder, weights, method="cat", name="mix")
    layer = holder.layer
    assert layer.rank["mix"] == 4  # 6 directions in a 4×4 layer: the exact SVD of the sum takes over
    torch.testing.assert_close(layer.delta_weight("mix").double(), _weighted_delta(layer, weights), rtol=0, atol=1e-6)


def test_svd_is_the_best_rank_k_approximation(base_copy):
    model = _two_adapters(base_copy("llama"), LLAMA)
    weights = {"a": 0.7, "b": 0.3}
    lorakit.combine(model, weights, method="svd", name="low", rank=2)
    lorakit.combine(model, weights, method="svd", name="full", rank=16)
    for _, layer in lora_layers(model):
        total = _weighted_delta(layer, weights)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)  # (the best approximation of Mᵀ is its transpose)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        torch.testing.assert_close(layer.delta_weight("low").double(), best, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.delta_weight("full").double(), total, rtol=0, atol=1e-5)


def test_linear_mixes_the_factors_like_peft(base_copy, unchanged):
    model = _two_adapters(
        base_copy("llama"),
        {
            "a": LoraConfig(r=2, alpha=4, target_modules=["q_proj"]),
            "b": LoraConfig(r=2, alpha=3, target_modules=["q_proj"]),
        },
    )
    weights = {"a": 0.6, "b": -0.4}
    lorakit.combine(model, weights, method="linear", name="mix")
    lorakit.combine(model, {"b": -0.4}, method="linear", name="single")
    for _, layer in lora_layers(model):
        a_sum, b_sum = 0, 0
        for n, w in weights.items():
            scale = w * layer.scaling[n]
            a_sum = a_sum + math.copysign(math.sqrt(abs(scale)), scale) * layer.lora_A[n].weight.double()
            b_sum = b_sum + math.sqrt(abs(scale)) * layer.lora_B[n].weight.double()
        torch.testing.assert_close(layer.delta_weight("mix").double(), b_sum @ a_sum, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            layer.delta_weight("single").double(), -0.4 * layer.delta_weight("b").double(), rtol=0, atol=1e-6
        )
    lorakit.add_adapter(model, LoraConfig(r=3, target_modules=["q_proj"]), "c")
    with unchanged(model), pytest.raises(ValueError, match="needs equal ranks"):
        lorakit.combine(model, {"a": 1, "c": 1}, method="linear", name="bad")


def _ties_reference(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES written out entry by entry: keep the top-k magnitudes, elect the sign of the weighted sum, average
    the agreeing weighted entries."""
    kept = []
    for delta in deltas:
        k = round(density * delta.numel())
        threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
        kept.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    weighted = [w * d for w, d in zip(weights, kept)]
    sign = torch.sign(sum(weighted))
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for d in weighted:
        agree = (torch.sign(d) == sign) & (d != 0)
        total += torch.where(agree, d, torch.zeros_like(d))
        count += agree
    return total / count.clamp(min=1)


def test_ties_matches_the_formula(base_copy):
    model = _two_adapters(
        base_copy("llama"),
        {
            "a": LoraConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"]),
            "b": LoraConfig(r=4, alpha=4, target_modules=["q_proj"]),
        },
    )
    weights = {"a": 0.8, "b": -0.5}
    lorakit.combine(model, weights, method="ties", name="t", rank=16, density=0.25)
    for _, layer in lora_layers(model):
        present = [n for n in weights if n in layer.scaling]
        expected = _ties_reference(
            [layer.delta_weight(n).double() for n in present], [weights[n] for n in present], 0.25
        )
        torch.testing.assert_close(layer.delta_weight("t").double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "peft_method", "weights", "extra"),
    [
        ("cat", "cat", {"a": 0.7, "b": -0.3}, {}),
        ("svd", "svd", {"a": 0.7, "b": -0.3}, {"rank": 3}),
        (
            "ties",
            "ties_svd",
            {"a": 1.0, "b": 1.0},
            {"rank": 16, "density": 0.5},
        ),  # equal weights: PEFT elects the same signs
    ],
)
def test_same_outputs_as_pefts_add_weighted_adapter(
    method, peft_method, weights, extra, base_copy, input_ids, tmp_path
):
    configs = {
        "a": LoraConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"]),
        "b": LoraConfig(r=3, alpha=5, target_modules=["q_proj", "o_proj"], use_rslora=True),
    }
    model = _two_adapters(base_copy("llama"), configs)
    for name in configs:
        lorakit.save_adapter(model, tmp_path / name, name=name)
    lorakit.combine(model, weights, method=method, name="mix", activate=True, **extra)
    ours = model(input_ids).logits

    peft_model = PeftModel.from_pretrained(base_copy("llama"), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    peft_model.add_weighted_adapter(
        ["a", "b"],
        list(weights.values()),
        "mix",
        combination_type=peft_method,
        svd_rank=extra.get("rank"),
        density=extra.get("density"),
    )
    peft_model.set_adapter("mix")
    torch.testing.assert_close(ours, peft_model.eval()(input_ids).logits, rtol=0, atol=1e-5)


def test_combined_adapter_saves_and_loads_in_peft(base_copy, input_ids, tmp_path):
    model = _two_adapters(base_copy("llama"), LLAMA)
    lorakit.combine(model, {"a": 0.5, "b": 0.5}, method="cat", name="mix", activate=True)
    expected = model(input_ids).logits
    lorakit.save_adapter(model, tmp_path, name="mix")
    peft_model = PeftModel.from_pretrained(base_copy("llama"), tmp_path).eval()
    torch.testing.assert_close(peft_model(input_ids).logits, expected, rtol=0, atol=1e-5)
    fresh = base_copy("llama")
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(input_ids).logits, expected, rtol=0, atol=1e-5)


def test_a_trained_head_is_taken_from_its_adapter(base_copy, input_ids, unchanged):
    model = base_copy("bert")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "a")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["value"]), "b")
    randomize_lora(model)
    with torch.no_grad():
        model.classifier.modules_to_save["a"].weight.normal_()
    lorakit.combine(model, {"a": 1, "b": 1}, method="cat", name="mix")
    assert torch.equal(model.classifier.modules_to_save["mix"].weight, model.classifier.modules_to_save["a"].weight)
    lorakit.set_adapter(model, ["a", "b"])
    together = model(input_ids).logits
    lorakit.set_adapter(model, "mix")
    torch.testing.assert_close(model(input_ids).logits, together, rtol=0, atol=1e-5)

    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "c")
    with unchanged(model), pytest.raises(ValueError, match="own copy of 'classifier'"):
        lorakit.combine(model, {"a": 1, "c": 1}, name="bad")


def test_dora_combines_through_its_whole_update():
    torch.manual_seed(0)
    holder = Holder(nn.Linear(6, 5)).eval()
    lorakit.add_adapter(holder, LoraConfig(r=2, target_modules=["layer"], use_dora=True), "d")
    randomize_lora(holder, std=0.3)
    with pytest.raises(ValueError, match="use svd or ties"):
        lorakit.combine(holder, {"d": 1}, method="cat")
    x = torch.randn(3, 6)
    expected = holder(x)
    lorakit.combine(holder, {"d": 1}, method="svd", rank=5, name="plain", activate=True)  # full rank: exact
    torch.testing.assert_close(holder(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (dict(weights={"zz": 1}), "no adapter named 'zz'"),
        (dict(weights={}), "non-empty"),
        (dict(weights={"a": float("nan")}), "finite"),
        (dict(weights={"a": 1}, method="mean"), "method must be one of"),
        (dict(weights={"a": 1}, name="a"), "already exists"),
        (dict(weights={"a": 1}, rank=4), "rank applies to the svd and ties"),
        (dict(weights={"a": 1}, method="ties", density=0), "density"),
    ],
)
def test_bad_calls_are_refused_and_change_nothing(call, message, base_copy, unchanged):
    model = _two_adapters(base_copy("llama"), LLAMA)
    with unchanged(model), pytest.raises((ValueError, KeyError), match=message):
        lorakit.combine(model, **call)


def test_merged_model_is_refused(base_copy, unchanged):
    model = _two_adapters(base_copy("llama"), LLAMA)
    lorakit.merge(model)
    with unchanged(model), pytest.raises(RuntimeError, match="unmerge before combining"):
        lorakit.combine(model, {"a": 1, "b": 1})


# -- command line ---------------------------------------------------------------------------------
def test_cli_combine_writes_the_same_adapter_as_the_api(tmp_path):
    torch.manual_seed(0)
    base_dir = save_tiny_llama(tmp_path / "base")
    model, _ = load_model(str(base_dir), "causal-lm")
    reference = copy.deepcopy(model)
    _two_adapters(
        model,
        {
            "a": LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=str(base_dir)),
            "b": LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
        },
    )
    for name in "ab":
        lorakit.save_adapter(model, tmp_path / name, name=name)
    lorakit.combine(model, {"a": 0.7, "b": 0.3}, method="cat", name="mix", activate=True)
    ids = torch.tensor([[3, 5, 7, 9]])
    expected = model(ids).logits

    from lorakit.cli import app

    runner = CliRunner()
    args = [
        "combine",
        "--adapter",
        f"a={tmp_path / 'a'}",
        "--adapter",
        f"b={tmp_path / 'b'}",
        "--weights",
        "a=0.7,b=0.3",
        "--method",
        "cat",
        "--output",
        str(tmp_path / "mix"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lorakit.load_adapter(reference, tmp_path / "mix")
    torch.testing.assert_close(reference(ids).logits, expected, rtol=0, atol=1e-5)

    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "other"), "--weights", "c=1"])
    assert bad.exit_code == 2 and "not one of the adapters" in bad.output
