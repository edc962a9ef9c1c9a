"""Float32 master adapters on bf16 / fp16 bases, and the fused LoRA product under autocast (CPU, bf16).

References are float32 (or float64) recomputations written out here; bf16 results are compared within
bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import LoraLayer, lora_function
from lorakit.layers.lora_function import keep_mask, keep_threshold
from lorakit.quant import QuantLinear
from support.models import adapt_layer, fill_, make_bert, make_llama, max_relative_error

BF16 = torch.bfloat16


def _lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in f".{n}"}


def _copy_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".modules_to_save." in n}


def _bf16_layer(seed: int = 0, in_features: int = 32, out_features: int = 24, **config) -> tuple[nn.Module, LoraLayer]:
    torch.manual_seed(seed)
    holder = adapt_layer(nn.Linear(in_features, out_features).to(BF16), r=4, alpha=8, **config)
    layer = holder.layer
    fill_(layer.lora_A["default"].weight, 1)
    fill_(layer.lora_B["default"].weight, 2)
    return holder, layer


# -- the adapter's dtype ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_half_precision_base_gets_float32_factors_magnitudes_and_copies(dtype):
    model = make_llama().to(dtype)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    tensors = _lora_tensors(model)
    assert any("lora_magnitude_vector" in n for n in tensors) and any("lora_A" in n for n in tensors)
    assert {p.dtype for p in tensors.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" not in f".{n}"} == {dtype}

    bert = make_bert().to(dtype)
    lorakit.add_adapter(bert, lorakit.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    copies = _copy_params(bert)
    assert copies and {p.dtype for p in copies.values()} == {torch.float32}
    assert all(p.requires_grad for p in copies.values())
    assert bert.classifier.original_module.weight.dtype == dtype


def test_option_off_keeps_the_base_dtype():
    model = make_llama().to(BF16)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    lorakit.add_adapter(model, config, autocast_adapter_dtype=False)
    assert {p.dtype for p in _lora_tensors(model).values()} == {BF16}
    bert = make_bert().to(BF16)
    config = lorakit.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"])
    lorakit.add_adapter(bert, config, autocast_adapter_dtype=False)
    assert {p.dtype for p in _copy_params(bert).values()} == {BF16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_bases_keep_their_dtype(dtype):
    model = make_llama().to(dtype)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    assert {p.dtype for p in _lora_tensors(model).values()} == {dtype}


def test_quantized_base_gets_float32_factors():
    torch.manual_seed(0)
    holder = adapt_layer(QuantLinear.from_linear(nn.Linear(64, 32).to(BF16), "nf4"), r=4)
    assert {p.dtype for p in _lora_tensors(holder).values()} == {torch.float32}


def test_pissa_on_a_bf16_base_starts_at_the_base_function():
    torch.manual_seed(0)
    holder = adapt_layer(nn.Linear(32, 24).to(BF16), r=4, init="pissa")
    layer = holder.layer
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(5, 32).to(BF16)
    with torch.no_grad():
        torch.testing.assert_close(holder(x), layer.base_layer(x), rtol=0, atol=0)


# -- saving and loading ---------------------------------------------------------------------------
def test_saving_and_loading_keep_float32(tmp_path):
    bert = make_bert().to(BF16)
    config = lorakit.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    lorakit.add_adapter(bert, config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in [*_lora_tensors(bert).values(), *_copy_params(bert).values()]:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)  # float32 values bf16 cannot hold
    saved = {n: p.detach().clone() for n, p in [*_lora_tensors(bert).items(), *_copy_params(bert).items()]}
    lorakit.save_adapter(bert, tmp_path / "a")
    _, tensors = lorakit.read_adapter(tmp_path / "a")
    assert {t.dtype for t in tensors.values()} == {torch.float32}

    fresh = make_bert().to(BF16)
    lorakit.load_adapter(fresh, tmp_path / "a")
    loaded = {**_lora_tensors(fresh), **_copy_params(fresh)}
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name].detach(), value), name

    kept = make_bert().to(BF16)
    lorakit.load_adapter(kept, tmp_path / "a", autocast_adapter_dtype=False)
    assert {p.dtype for p in _lora_tensors(kept).values()} == {BF16}


def test_float32_copy_runs_in_a_bf16_model_and_unloads_to_bf16():
    bert = make_bert().to(BF16)
    lorakit.add_adapter(bert, lorakit.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = bert.bert(ids).pooler_output  # bf16
        logits = bert(ids).logits
    head = bert.classifier.modules_to_save["default"]
    expected = hidden.float() @ head.weight.t() + head.bias  # the float32 head, written out
    assert logits.dtype == BF16
    torch.testing.assert_close(logits.float(), expected, rtol=1e-2, atol=1e-2)
    lorakit.merge_and_unload(bert)
    assert isinstance(bert.classifier, nn.Linear) and bert.classifier.weight.dtype == BF16
    with torch.no_grad():
        assert bert(ids).logits.dtype == BF16


# -- forward without autocast ----------------------------------------------------------------------
def test_forward_without_autocast_runs_the_adapter_in_float32():
    holder, layer = _bf16_layer()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3)).to(BF16)
    with torch.no_grad():
        out = holder(x)
        base = layer.base_layer(x)
    adapter = 2.0 * (x.double() @ a.double().t()) @ b.double().t()  # α/r = 2
    assert out.dtype == BF16
    # The adapter's part, computed in float32 then rounded once: within one bf16 rounding of the sum.
    torch.testing.assert_close(out.double(), base.double() + adapter, rtol=8e-3, atol=1e-2)


# -- the fused product under autocast --------------------------------------------------------------
def _count_fused_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = lora_function.LoraDropoutProduct.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(lora_function.LoraDropoutProduct, "apply", counting)
    return calls


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fused_product_under_autocast_matches_a_float32_reference(monkeypatch, p):
    calls = _count_fused_calls(monkeypatch)
    holder, layer = _bf16_layer(in_features=64, out_features=48, dropout=p)
    holder.train()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(3)).to(BF16).requires_grad_(True)
    grad_out = torch.randn(4, 6, 48, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=BF16):
        out = holder(x)
    assert calls == [1] and out.dtype == BF16
    got = torch.autograd.grad(out, (x, a, b), grad_out.to(BF16))

    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    mask = keep_mask(seed, x.shape, p, x.device).float() * keep_threshold(p)[1] if p else torch.ones(x.shape)
    x32, a32, b32 = (t.detach().float().requires_grad_(True) for t in (x, a, b))
    w, bias = layer.base_layer.weight.detach().float(), layer.base_layer.bias.detach().float()
    expected = x32 @ w.t() + bias + 2.0 * ((x32 * mask) @ a32.t()) @ b32.t()
    want = torch.autograd.grad(expected, (x32, a32, b32), grad_out)
    assert max_relative_error(out.float(), expected.detach()) < 2e-2
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32 and got[0].dtype == BF16
    for name, g, w_ in zip("xAB", got, want):
        assert max_relative_error(g.float(), w_) < 3e-2, name


def test_fused_product_inside_autocast_with_a_float32_base(monkeypatch):
    """autocast over a float32 model: the base runs in bf16, the fused adapter too, gradients stay float32."""
    calls = _count_fused_calls(monkeypatch)
    torch.manual_seed(0)
    holder = adapt_layer(nn.Linear(32, 16), r=4, alpha=4)
    fill_(holder.layer.lora_B["default"].weight, 2)
    holder.train()
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=BF16):
        out = holder(x)
    out.float().pow(2).sum().backward()
    a, b = holder.layer.lora_A["default"].weight, holder.layer.lora_B["default"].weight
    assert calls == [1] and out.dtype == BF16
    assert a.grad is not None and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_model_training_step_under_autocast_on_a_bf16_base(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    model = make_llama().to(BF16)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], dropout=0.1))
    model.train()
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=BF16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert len(calls) == 4  # 2 layers × (q, v)
    grads = [p.grad for p in _lora_tensors(model).values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# -- merging ------------------------------------------------------------------------------------
def test_merge_into_a_bf16_base_rounds_the_sum_once():
    holder, layer = _bf16_layer()
    w0 = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    expected = (w0.double() + 2.0 * (b.double() @ a.double())).float().to(BF16)
    lorakit.merge(holder)
    merged = layer.base_layer.weight.detach()
    assert merged.dtype == BF16
    # bf16(W0 + ΔW): equal to the rounded float64 sum except where float32 sits on a rounding boundary.
    assert (merged != expected).float().mean() < 0.01
    torch.testing.assert_close(merged.float(), expected.float(), rtol=8e-3, atol=0)
    merged = merged.float().clone()
    lorakit.unmerge(holder)
    # Unmerging rounds again: W0 back within half a bf16 step of the merged value and half one of W0.
    error = (layer.base_layer.weight.detach().float() - w0.float()).abs()
    assert (error <= (merged.abs() + w0.float().abs()) * 2**-8).all()


# -- the symptom ------------------------------------------------------------------------
def _fraction_of_a_changed_by_one_adamw_step(autocast_adapter_dtype: bool) -> float:
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(64, 64)).to(BF16)
    config = lorakit.LoraConfig(r=8, alpha=16, target_modules=["0"])
    lorakit.add_adapter(holder, config, autocast_adapter_dtype=autocast_adapter_dtype)
    layer = holder[0]
    fill_(layer.lora_B["default"].weight, 2, std=0.1)  # B ≠ 0, so A gets a gradient
    a = layer.lora_A["default"].weight
    before = a.detach().clone()
    optimizer = torch.optim.AdamW([p for p in holder.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)).to(BF16)
    holder.train()
    holder(x).float().pow(2).mean().backward()
    optimizer.step()
    return (a.detach() != before).float().mean().item()


def test_one_adamw_step_changes_nearly_all_of_a_on_a_bf16_base():
    assert _fraction_of_a_changed_by_one_adamw_step(True) > 0.99
    # The symptom the float32 masters fix: in bf16 most updates of size lr round away.
    assert _fraction_of_a_changed_by_one_adamw_step(False) < 0.6


# -- DoRA and convolutions under autocast -----------------------------------------------------------
def test_dora_on_a_bf16_base_under_autocast_matches_a_float32_reference():
    holder, layer = _bf16_layer(use_dora=True)
    magnitude = layer.lora_magnitude_vector["default"]
    fill_(magnitude, 3)
    assert magnitude.dtype == torch.float32
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3)).to(BF16)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out = holder(x)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    w0, bias = layer.base_layer.weight.detach().float(), layer.base_layer.bias.detach().float()
    adapted = w0 + 2.0 * b @ a
    weight = magnitude.detach()[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    expected = x.float() @ weight.t() + bias
    assert out.dtype == BF16
    assert max_relative_error(out.float(), expected) < 2e-2


def test_conv2d_on_a_bf16_base_with_and_without_autocast():
    torch.manual_seed(0)
    holder = adapt_layer(nn.Conv2d(3, 8, 3, padding=1).to(BF16), r=2, alpha=2)
    layer = holder.layer
    a, b = fill_(layer.lora_A["default"].weight, 1), fill_(layer.lora_B["default"].weight, 2)
    assert a.dtype == torch.float32
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3)).to(BF16)
    weight = layer.base_layer.weight.detach().float() + (b.detach().flatten(1) @ a.detach().flatten(1)).reshape(
        8, 3, 3, 3
    )
    expected = nn.functional.conv2d(x.float(), weight, layer.base_layer.bias.detach().float(), padding=1)
    with torch.no_grad():
        plain = holder(x)
        with torch.autocast("cpu", dtype=BF16):
            autocast = holder(x)
    for out in (plain, autocast):
        assert out.dtype == BF16 and max_relative_error(out.float(), expected) < 2e-2
