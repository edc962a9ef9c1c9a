"""QuantLinear and `lorakit.quantize` on tiny models: the forward and input gradient equal a float layer
holding the decoded weight, chunked decoding, no float copy kept for backward, state dicts, dtype moves,
the bad inputs of `quantize`, merging onto a quantized base, and saving / loading the quantized base."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.layers import LoraLayer
from lorakit.quant import QuantLinear, quantize, requantization_errors
from lorakit.quant.nf4 import NF4Codec, nf4_code
from support.models import make_gpt2, make_llama, randomize_lora

METHOD_OPTIONS = {
    "nf4": {"method": "nf4"},
    "nf4-no-dq": {"method": "nf4", "double_quant": False},
    "int8": {"method": "int8"},
    "int8-asym": {"method": "int8-asym"},
}
LLAMA_HIDDEN = 36  # 36×36 and 18×36 weights are not whole numbers of 64-value blocks: padding is exercised


def _linear(in_features: int = 100, out_features: int = 37, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(METHOD_OPTIONS))
def test_forward_and_input_gradient_equal_the_decoded_float_layer(kind):
    linear = _linear()
    layer = QuantLinear.from_linear(linear, **METHOD_OPTIONS[kind])
    weight = layer.dequantize()
    assert weight.shape == (37, 100) and weight.dtype == torch.float32
    assert (weight - linear.weight).abs().max() < 0.16 * linear.weight.abs().max()  # it is a quantization of W
    x = _x(2, 5, 100).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = F.linear(x_ref, weight, linear.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    grad = _x(2, 5, 37)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def test_decoded_weights_match_plain_references():
    linear = _linear(bias=False)
    w = linear.weight.detach()
    # int8: round(w·s) / s with s = 127 / max|row|
    scale = 127 / w.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(QuantLinear.from_linear(linear, "int8").dequantize(), torch.round(w * scale) / scale)
    # NF4 without double quantization: nearest level of each 64-value block scaled by its absmax
    code = nf4_code()
    flat = torch.cat([w.reshape(-1), w.new_zeros((-w.numel()) % 64)]).view(-1, 64)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    nearest = (flat.unsqueeze(-1) / absmax.unsqueeze(-1) - code).abs().argmin(dim=-1)
    expected = (code[nearest] * absmax).reshape(-1)[: w.numel()].view_as(w)
    torch.testing.assert_close(QuantLinear.from_linear(linear, "nf4", double_quant=False).dequantize(), expected)


@pytest.mark.parametrize("kind", ["nf4", "int8-asym"])
def test_row_chunks_give_the_same_result(kind):
    linear = _linear()
    whole = QuantLinear.from_linear(linear, **METHOD_OPTIONS[kind])
    chunked = QuantLinear.from_linear(linear, **METHOD_OPTIONS[kind])
    chunked.chunk_elements = 250  # 2 rows of 100 per chunk: 19 chunks, most not aligned with 64-value blocks
    x1, x2 = _x(3, 100).requires_grad_(), _x(3, 100).requires_grad_()
    y1, y2 = whole(x1), chunked(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-6)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.dequantize(), whole.dequantize(), rtol=0, atol=0)


def test_base_holds_no_trainable_state_and_backward_keeps_no_float_weight():
    linear = _linear(200, 150)
    layer = QuantLinear.from_linear(linear, "nf4")
    assert [name for name, _ in layer.named_parameters()] == ["bias"] and not layer.bias.requires_grad
    assert all(not b.requires_grad and not b.is_floating_point() or b.numel() < 1000 for b in layer.buffers())
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    x = _x(4, 200).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    floats = [t for t in saved if t.is_floating_point() and t.numel() >= 150 * 200]
    assert floats == [], "a float copy of the weight was saved for backward"
    assert sum(t.numel() * t.element_size() for t in saved) <= layer.quantized_bytes()
    y.sum().backward()
    assert x.grad is not None and layer.bias.grad is None


def test_no_grad_forward_changes_nothing_for_later_backward():
    layer = QuantLinear.from_linear(_linear(), "nf4")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _x(3, 100).requires_grad_()
    layer(x).sum().backward()
    first = x.grad.clone()
    with torch.no_grad():
        layer(x)
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("kind", list(METHOD_OPTIONS))
def test_state_dict_loads_into_an_empty_layer(kind):
    options = dict(METHOD_OPTIONS[kind])
    layer = QuantLinear.from_linear(_linear(), **options)
    method = options.pop("method")
    empty = QuantLinear(100, 37, method, **options)
    empty.load_state_dict(layer.state_dict())
    x = _x(2, 100)
    torch.testing.assert_close(empty(x), layer(x), rtol=0, atol=0)


def test_dtype_casts_keep_the_stored_format():
    layer = QuantLinear.from_linear(_linear(), "int8")
    dtypes = {name: t.dtype for name, t in layer.named_buffers()}
    expected = layer(_x(2, 100))
    layer.to(torch.bfloat16)
    assert {name: t.dtype for name, t in layer.named_buffers()} == dtypes  # fp32 row scales stay fp32
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    out = layer(_x(2, 100).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    wide = QuantLinear.from_linear(_linear(), "int8").double()
    assert wide.compute_dtype == torch.float64 and wide.weight_scale.dtype == torch.float32
    torch.testing.assert_close(wide(_x(2, 100).double()).float(), expected, rtol=1e-5, atol=1e-5)


def test_odd_shapes_are_padded_not_rejected():
    layer = QuantLinear.from_linear(_linear(9, 7), "nf4")  # 63 values: one partial block, odd count
    assert layer.weight_packed.numel() == 32
    torch.testing.assert_close(layer(_x(2, 9)), F.linear(_x(2, 9), layer.dequantize(), layer.bias))


# -- quantize(model) ------------------------------------------------------------------------------
def test_quantize_replaces_linears_and_lists_what_it_kept():
    model = make_llama(hidden=LLAMA_HIDDEN)
    total = lorakit.trainable_parameters(model)[1]
    report = quantize(model, "nf4")
    assert lorakit.trainable_parameters(model)[1] == total  # a quantized weight still counts as its parameters
    assert len(report.quantized) == 14  # 2 layers × (q, k, v, o, gate, up, down)
    assert all(isinstance(model.get_submodule(p), QuantLinear) for p in report.quantized)
    assert isinstance(model.lm_head, nn.Linear) and report.skipped["lm_head"] == "in skip list"
    assert "Embedding is not a supported layer type" in report.skipped["model.embed_tokens"]
    assert report.quantized_bytes < 0.2 * report.float_bytes
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters())


def test_quantize_keeps_tied_weights_and_other_layer_types():
    tied = make_llama(tied=True, hidden=LLAMA_HIDDEN)
    report = quantize(tied, "int8", skip=[])
    assert report.skipped["lm_head"] == "weight tied to model.embed_tokens"
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    gpt2 = make_gpt2()  # its projections are Conv1D, its lm_head is tied: nothing to quantize, and why
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize") as failure:
        quantize(gpt2, "nf4", skip=[])
    assert "Conv1D is not a supported layer type" in str(failure.value)
    assert "weight tied to transformer.wte" in str(failure.value)


def test_quantize_skip_list_and_bad_input(unchanged):
    model = make_llama(hidden=LLAMA_HIDDEN)
    report = quantize(model, "nf4", skip=["down_proj", "lm_head"])
    assert {p for p in report.skipped if p.endswith("down_proj")} == {
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    }
    with unchanged(model), pytest.raises(ValueError, match="already quantized"):
        quantize(model, "nf4")
    fresh = make_llama(hidden=LLAMA_HIDDEN)
    with unchanged(fresh), pytest.raises(ValueError, match="unknown quantization method"):
        quantize(fresh, "int4")
    with unchanged(fresh), pytest.raises(ValueError, match="block size"):
        quantize(fresh, "nf4", block_size=63)
    lorakit.add_adapter(fresh, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with unchanged(fresh), pytest.raises(ValueError, match="before adding adapters"):
        quantize(fresh, "nf4")


def test_all_linear_targets_quantized_layers():
    model = make_llama(hidden=LLAMA_HIDDEN)
    quantize(model, "nf4")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    wrapped = [p for p, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == 14 and "lm_head" not in wrapped


# -- merging onto a quantized base -----------------------------------------------------------------
def _adapted(method: str = "nf4") -> nn.Module:
    model = make_llama(hidden=LLAMA_HIDDEN)
    quantize(model, method)
    torch.manual_seed(0)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model, std=0.03)  # ΔW about a fifth of W's spread, like a trained adapter
    return model


def test_merge_requantizes_and_reports_the_error(input_ids):
    model = _adapted()
    q_proj = model.model.layers[0].self_attn.q_proj
    exact = q_proj.base_layer.dequantize() + q_proj.delta_weight("default").detach()
    with pytest.warns(UserWarning, match="re-quantizes the weight"):
        lorakit.merge(model)
    merged = q_proj.base_layer.dequantize()
    codec = NF4Codec()
    torch.testing.assert_close(merged, codec.decode_rows(codec.encode(exact), 0, LLAMA_HIDDEN, LLAMA_HIDDEN))
    errors = requantization_errors(model)
    assert len(errors) == 14
    recorded = errors["model.layers.0.self_attn.q_proj"]
    assert recorded["operation"] == "merge"
    assert recorded["max_abs"] == pytest.approx((merged - exact).abs().max().item(), rel=1e-5)
    assert recorded["rel_frobenius"] == pytest.approx(((merged - exact).norm() / exact.norm()).item(), rel=1e-5)
    assert 0 < recorded["rel_frobenius"] < 0.15
    # Unmerging puts the original codes back (kept by the reversible merge): the base of a fresh copy, bit for bit.
    original = make_llama(hidden=LLAMA_HIDDEN)
    quantize(original, "nf4")
    reference = original.model.layers[0].self_attn.q_proj.state_dict()
    lorakit.unmerge(model)
    restored = q_proj.base_layer.state_dict()
    assert restored.keys() == reference.keys() and all(torch.equal(restored[k], reference[k]) for k in reference)
    assert requantization_errors(model) == {}


def test_irreversible_merge_then_unmerge_requantizes_again():
    model = _adapted()
    q_proj = model.model.layers[0].self_attn.q_proj
    reference = q_proj.base_layer.dequantize()
    with pytest.warns(UserWarning, match="re-quantizes"):
        lorakit.merge(model, reversible=False)
    with pytest.warns(UserWarning, match="re-quantizes"):
        lorakit.unmerge(model)
    restored = q_proj.base_layer.dequantize()
    assert (restored - reference).norm() / reference.norm() < 0.15  # close, not bit-identical (documented)
    assert requantization_errors(model)["model.layers.0.self_attn.q_proj"]["operation"] == "unmerge"


def test_merge_and_unload_to_float_is_exact(input_ids):
    model = _adapted()
    with torch.no_grad():
        expected = model(input_ids).logits
    plain = lorakit.merge_and_unload(model, dtype=torch.float32)
    assert not any(isinstance(m, (QuantLinear, LoraLayer)) for m in plain.modules())
    assert isinstance(plain.model.layers[0].mlp.down_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_merge_and_unload_keeps_a_quantized_model_without_dtype(input_ids):
    model = _adapted("int8")
    with torch.no_grad():
        expected = model(input_ids).logits
    with pytest.warns(UserWarning):
        merged = lorakit.merge_and_unload(model)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, QuantLinear)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    with torch.no_grad():
        assert (merged(input_ids).logits - expected).abs().max() < 0.05 * expected.abs().max()


def test_dora_is_refused_on_a_quantized_base(unchanged):
    model = make_llama(hidden=LLAMA_HIDDEN)
    quantize(model, "nf4")
    with unchanged(model), pytest.raises(ValueError, match="DoRA"):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))


# -- saving and loading the quantized base ---------------------------------------------------------
@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_the_quantized_base(tmp_path, input_ids, method, tied):
    model = make_llama(tied=tied, hidden=LLAMA_HIDDEN)
    quantize(model, method)
    path = lorakit.save_quantized(model, tmp_path / "base.safetensors")
    torch.manual_seed(123)  # a float model of the same architecture with other random weights
    fresh = type(model)(model.config).eval()
    lorakit.load_quantized(fresh, path)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]
    if tied:
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    # Float model bytes vs file: the quantized linears are a fraction of their float size.
    assert path.stat().st_size < sum(
        t.numel() * t.element_size() for t in make_llama(tied=tied, hidden=LLAMA_HIDDEN).state_dict().values()
    )


def test_save_strips_adapters_and_load_checks_the_model(tmp_path, input_ids, unchanged):
    model = _adapted()
    path = lorakit.save_quantized(model, tmp_path / "base.safetensors")
    fresh = make_llama(hidden=LLAMA_HIDDEN)
    lorakit.load_quantized(fresh, path)
    with lorakit.disable_adapters(model), torch.no_grad():
        torch.testing.assert_close(fresh(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    other = make_llama()  # hidden 16: shapes differ
    with unchanged(other), pytest.raises(ValueError, match="model.layers.0"):
        lorakit.load_quantized(other, path)
    with unchanged(fresh), pytest.raises(ValueError, match="already quantized"):
        lorakit.load_quantized(fresh, path)
