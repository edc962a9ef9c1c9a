"""The contract every LoRA layer type keeps, for every variant it supports: the output equals the base at
init; merging adds exactly ΔW, written out here in float64 from the factors (scaling·B·A in the base layout;
for DoRA m ⊙ (W0 + ΔW)/‖W0 + ΔW‖ − W0); the merged output equals the unmerged one; unmerging restores W0
(bit for bit after a reversible merge, up to rounding after `reversible=False`);
gradients reach only the adapter's parameters; invalid ranks and unsupported variants are refused, leaving
the layer unchanged; the public views of an adapter (factors, deltas, layouts) agree with each other.

A quantized base re-quantizes on merge, so there "exactly" means: the stored weight is the quantization of
W0 + ΔW, outputs are off by no more than the recorded rounding error, and unmerge gives the original codes back
(after `reversible=False`: W0 off by no more than the two recorded rounding errors).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.quant import QuantLinear
from support.models import Holder, fill_

IN, OUT, VOCAB, DIM, C_IN, C_OUT = 12, 10, 20, 6, 3, 5
R, ALPHA = 3, 5.0

VARIANTS = {  # LoraConfig fields of each variant
    "plain": {},
    "rslora": {"use_rslora": True},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "dora": {"use_dora": True},
    "pissa-dora": {"init": "pissa", "use_dora": True},
}
RANDOM_INIT = ("plain", "rslora", "gaussian")
SUPPORTED = {
    "linear": tuple(VARIANTS),
    "conv1d": tuple(VARIANTS),
    "embedding": RANDOM_INIT,
    "conv2d": RANDOM_INIT,
    "quant-nf4": (*RANDOM_INIT, "pissa", "olora"),  # DoRA would rescale the quantized weight in place
    "quant-int8": (*RANDOM_INIT, "pissa", "olora"),
}
CASES = [
    pytest.param(kind, variant, id=f"{kind}-{variant}") for kind, variants in SUPPORTED.items() for variant in variants
]
REFUSED = [
    pytest.param(kind, variant, id=f"{kind}-{variant}")
    for kind, variants in SUPPORTED.items()
    for variant in VARIANTS
    if variant not in variants
]


def _quantized(kind: str) -> bool:
    return kind.startswith("quant")


def _base(kind: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(IN, OUT).to(dtype)
    if kind == "conv1d":
        layer = Conv1D(OUT, IN)  # weight stored (in, out)
        nn.init.normal_(layer.weight, std=0.3)
        nn.init.normal_(layer.bias, std=0.1)  # transformers initialises it to zero; make it count
        return layer.to(dtype)
    if kind == "embedding":
        return nn.Embedding(VOCAB, DIM).to(dtype)
    if kind == "conv2d":
        return nn.Conv2d(C_IN, C_OUT, 3, stride=2, padding=1).to(dtype)
    return QuantLinear.from_linear(nn.Linear(IN, OUT), kind.removeprefix("quant-"))  # float32 compute


def _input(kind: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    if kind == "embedding":
        return torch.randint(0, VOCAB, (3, 7), generator=generator)
    if kind == "conv2d":
        return torch.randn(2, C_IN, 9, 8, generator=generator, dtype=dtype)
    return torch.randn(2, 3, IN, generator=generator, dtype=torch.float32 if _quantized(kind) else dtype)


def _adapted(kind: str, variant: str, dtype: torch.dtype = torch.float64) -> Holder:
    holder = Holder(_base(kind, dtype))
    lorakit.add_adapter(holder, lorakit.LoraConfig(r=R, alpha=ALPHA, target_modules=["layer"], **VARIANTS[variant]))
    return holder.eval()


def _trained(holder: Holder) -> dict[str, torch.Tensor]:
    """Random A, B (B ≠ 0) and DoRA magnitude; returns the float64 values the reference formulas start from,
    with A0, B0 (the start of a PiSSA / OLoRA adapter) taken before."""
    layer = holder.layer
    start = {
        "a0": layer.lora_a_weight("default").detach().double().clone(),
        "b0": layer.lora_b_weight("default").detach().double().clone(),
    }
    values = {
        **start,
        "a": fill_(layer.lora_a_weight("default"), 1, std=0.3).detach().double(),
        "b": fill_(layer.lora_b_weight("default"), 2, std=0.3).detach().double(),
    }
    if "default" in getattr(layer, "lora_magnitude_vector", {}):
        magnitude = layer.lora_magnitude_vector["default"]
        with torch.no_grad():
            magnitude.mul_(1 + 0.3 * torch.rand(magnitude.shape, generator=torch.Generator().manual_seed(3)))
        values["m"] = magnitude.detach().double()
    return values


def _base_weight(kind: str, base: nn.Module) -> torch.Tensor:
    return (base.dequantize(torch.float64) if _quantized(kind) else base.weight.detach().double()).clone()


def _expected_delta(kind: str, variant: str, w0: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW in the base weight's layout, in float64, from the factors."""
    a, b, scaling = values["a"], values["b"], ALPHA / (R**0.5 if variant == "rslora" else R)
    if kind == "conv2d":  # the 1×1 conv B after A: A's r kernels mixed by B
        return scaling * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    product = b @ a - (values["b0"] @ values["a0"] if "pissa" in variant or variant == "olora" else 0)
    transposed = kind in ("conv1d", "embedding")  # tables and Conv1D weights are stored (in, out)
    delta = scaling * product
    if "dora" in variant:
        w0_matrix = w0.T if transposed else w0
        weight = w0_matrix + delta
        delta = (values["m"] / torch.linalg.norm(weight, dim=1))[:, None] * weight - w0_matrix
    return delta.T if transposed else delta


@pytest.mark.parametrize(("kind", "variant"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_at_init_equals_the_base(kind, variant, dtype):
    base = _base(kind, dtype)
    x = _input(kind, dtype)
    expected = base(x)
    holder = Holder(base)
    lorakit.add_adapter(holder, lorakit.LoraConfig(r=R, alpha=ALPHA, target_modules=["layer"], **VARIANTS[variant]))
    layer = holder.layer
    if variant in RANDOM_INIT:  # ΔW = 0 because B = 0, not because A is
        assert torch.count_nonzero(layer.lora_b_weight("default")) == 0
        assert torch.count_nonzero(layer.lora_a_weight("default")) > 0
    if variant in ("pissa", "olora", "pissa-dora"):  # B·A − B0·A0 runs as two products: equal up to rounding
        torch.testing.assert_close(holder(x), expected, rtol=0, atol=1e-12 if expected.dtype == torch.float64 else 1e-5)
    else:
        assert torch.equal(holder(x), expected)


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_merge_adds_delta_w_and_unmerge_restores_w0(kind, variant):
    holder = _adapted(kind, variant)
    base = holder.layer.base_layer
    w0 = _base_weight(kind, base)
    expected = _expected_delta(kind, variant, w0, _trained(holder))
    torch.testing.assert_close(
        holder.layer.delta_weight("default").double(), expected, rtol=0, atol=1e-6 if _quantized(kind) else 1e-12
    )
    x = _input(kind)
    unmerged = holder(x)
    if _quantized(kind):
        _check_quantized_merge(holder, x, unmerged, w0, expected)
        return
    lorakit.merge(holder)
    torch.testing.assert_close(base.weight.detach(), w0 + expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(holder(x), unmerged, rtol=0, atol=1e-12)
    lorakit.unmerge(holder)
    assert torch.equal(base.weight.detach(), w0)  # the bits kept by the reversible merge
    torch.testing.assert_close(holder(x), unmerged, rtol=0, atol=1e-12)
    lorakit.merge(holder, reversible=False)  # no copy kept: unmerge subtracts, exact up to rounding
    lorakit.unmerge(holder)
    torch.testing.assert_close(base.weight.detach(), w0, rtol=0, atol=1e-12)


def _check_quantized_merge(
    holder: Holder, x: torch.Tensor, unmerged: torch.Tensor, w0: torch.Tensor, delta: torch.Tensor
) -> None:
    base = holder.layer.base_layer
    reference = copy.deepcopy(base)
    reference.quantize_((w0 + delta).to(torch.float32))
    with pytest.warns(UserWarning, match="re-quantizes"):
        lorakit.merge(holder)
    merged_weight = base.dequantize(torch.float64)
    torch.testing.assert_close(merged_weight, reference.dequantize(torch.float64))
    merge_error = holder.layer.requantization_error["max_abs"]
    assert merge_error == pytest.approx((merged_weight - (w0 + delta)).abs().max().item(), rel=1e-4, abs=1e-7)
    bound = x.abs().sum(dim=-1, keepdim=True) * merge_error + 1e-5  # |Σ_j x_j·e_ij| ≤ Σ_j |x_j| · max |e|
    assert ((holder(x) - unmerged).abs() <= bound).all()
    lorakit.unmerge(holder)  # the reversible merge kept the codes: they come back bit for bit
    assert torch.equal(base.dequantize(torch.float64), w0) and holder.layer.requantization_error == {}
    with pytest.warns(UserWarning, match="re-quantizes"):
        lorakit.merge(holder, reversible=False)
    merge_error = holder.layer.requantization_error["max_abs"]
    with pytest.warns(UserWarning, match="re-quantizes"):
        lorakit.unmerge(holder)  # without the kept codes: quantized again
    unmerge_error = holder.layer.requantization_error["max_abs"]
    assert (base.dequantize(torch.float64) - w0).abs().max() <= merge_error + unmerge_error + 1e-6


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_merged_output_equals_unmerged_in_float32(kind, variant):
    holder = _adapted(kind, variant, torch.float32)
    _trained(holder)
    x = _input(kind, torch.float32)
    unmerged = holder(x)
    if _quantized(kind):
        return  # re-quantization: bounded in test_merge_adds_delta_w_and_unmerge_restores_w0
    lorakit.merge(holder)
    merged = holder(x)
    lorakit.unmerge(holder)
    scale = unmerged.abs().max()
    assert (merged - unmerged).abs().max() <= 1e-5 * scale
    assert (holder(x) - unmerged).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_gradients_reach_only_the_adapter(kind, variant):
    holder = _adapted(kind, variant).train()
    _trained(holder)
    holder(_input(kind)).pow(2).sum().backward()
    layer = holder.layer
    own = {id(getattr(layer, c)["default"]) for c in layer.containers_for("default")}
    own |= {id(layer.adapter_tensor(c, "default")) for c in layer.adapter_containers}
    for name, param in holder.named_parameters():
        if id(param) in own:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    assert len([p for p in holder.parameters() if p.grad is not None]) == len(layer.containers_for("default"))


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_rank_above_min_in_out_is_refused(kind, variant, unchanged):
    holder = _adapted(kind, variant)
    layer = holder.layer
    r = layer.max_rank() + 1
    config = lorakit.LoraConfig(r=r, target_modules=["layer"], **VARIANTS[variant])
    message = rf"r={r} .*exceeds min\(in, out\) = min\({layer.in_features}, {layer.out_features}\)"
    with unchanged(holder), pytest.raises(ValueError, match=message):
        lorakit.add_adapter(holder, config, "too_big")
    with unchanged(holder), pytest.raises(ValueError, match=rf"r={r} exceeds min\(in, out\)"):
        layer.add_adapter("too_big", r, 1.0, 0.0, config.init, config.use_dora)


@pytest.mark.parametrize(("kind", "variant"), REFUSED)
def test_unsupported_variants_are_refused(kind, variant, unchanged):
    holder = _adapted(kind, "plain")
    config = lorakit.LoraConfig(r=R, target_modules=["layer"], **VARIANTS[variant])
    with unchanged(holder), pytest.raises(ValueError, match="DoRA|is implemented for Linear"):
        lorakit.add_adapter(holder, config, "other")


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_the_public_views_agree(kind, variant):
    holder = _adapted(kind, variant)
    _trained(holder)
    layer = holder.layer
    b, a = layer.lora_factors("default")
    assert (b.ndim, a.ndim, b.shape[0], a.shape[1]) == (2, 2, layer.out_features, layer.in_features)
    low_rank = layer.low_rank_delta("default")
    torch.testing.assert_close(layer.scaling["default"] * b @ a, low_rank, rtol=0, atol=1e-6)
    weight = layer.to_matrix_layout(layer.weight)
    assert weight.shape == (layer.out_features, layer.in_features)
    assert torch.equal(layer.to_base_layout(weight), layer.weight)
    assert layer.fan_in_fan_out == (kind == "conv1d")
    if "dora" not in variant:
        torch.testing.assert_close(layer.to_matrix_layout(layer.delta_weight("default")), low_rank, rtol=0, atol=0)
    if layer.supports_dora:
        assert layer.magnitude_shape() == (layer.out_features,)
