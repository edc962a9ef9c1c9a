"""The fused LoRA training path (seeded dropout mask, fewer saved tensors) against plain autograd in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.layers.lora_function import (
    LoraDropoutProduct,
    keep_mask,
    keep_threshold,
    kept_elements,
    lora_dropout_product,
    low_rank_product,
    mark_dropped,
    narrow_product,
)
from support.models import adapt_layer, fill_, max_relative_error


def dropout_mask(seed: int, shape: torch.Size, p: float) -> torch.Tensor:
    """The float mask the fused path applies: kept entries scaled by the inverse of the effective keep rate."""
    return keep_mask(seed, shape, p, torch.device("cpu")).double() * keep_threshold(p)[1]


def _inputs(requires_grad: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    x[0, :, :2] = torch.tensor([-0.0, 0.0], dtype=torch.float64)  # signed zeros: kept ones still pass gradients
    x.requires_grad_(requires_grad)
    a = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    return x, a, b


def test_mask_is_reproducible_unbiased_and_drops_at_rate_p():
    shape = torch.Size([400, 500])
    mask = dropout_mask(11, shape, 0.1)
    assert torch.equal(mask, dropout_mask(11, shape, 0.1))
    assert not torch.equal(mask, dropout_mask(12, shape, 0.1))
    kept = mask != 0
    # Every kept value is the inverse of the effective keep rate, which is within 1/65536 of 1 − p.
    assert torch.allclose(mask[kept], torch.full_like(mask[kept], 1 / 0.9), rtol=2e-5)
    drop_rate = 1 - kept.double().mean().item()
    assert abs(drop_rate - 0.1) < 5 * (0.1 * 0.9 / shape.numel()) ** 0.5  # 5 standard errors
    assert abs(mask.mean().item() - 1.0) < 0.005
    # Lanes are independent of position: rows and columns drop at the same rate.
    assert kept.double().mean(0).std() < 0.05 and kept.double().mean(1).std() < 0.05


def test_threshold_quantises_the_keep_rate_finely():
    for p in (0.05, 0.1, 0.3, 0.5):
        threshold, scale = keep_threshold(p)
        keep = (threshold + 32768) / 65536
        assert abs(keep - (1 - p)) <= 1 / 65536 and scale == pytest.approx(1 / keep)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_the_marked_dropped_input_holds_the_values_and_the_mask(dtype):
    """mark_dropped's tensor equals where(keep, x, 0) as numbers, and kept_elements gives `keep` back, also where
    x is −0.0, +0.0, infinite or NaN."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 48, generator=g).to(dtype)
    x[0, :6] = torch.tensor([-0.0, 0.0, -0.0, 0.0, float("inf"), float("nan")]).to(dtype)
    keep = keep_mask(4, x.shape, 0.3, x.device)
    keep[0, :4] = torch.tensor([True, True, False, False])
    marked = mark_dropped(x, keep)
    assert marked.dtype == dtype and torch.equal(kept_elements(marked), keep)
    torch.testing.assert_close(marked, torch.where(keep, x, 0.0), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("owns_input", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gradients_equal_plain_autograd_with_the_same_mask(p, owns_input):
    x, a, b = _inputs()
    out = LoraDropoutProduct.apply(x, a, b, 1.5, p, 123, None, owns_input)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    fused = torch.autograd.grad(out, (x, a, b), grad_out)

    x2, a2, b2 = _inputs()
    mask = dropout_mask(123, x2.shape, p) if p else torch.ones_like(x2)
    expected_out = 1.5 * (x2 * mask) @ a2.t() @ b2.t()
    expected = torch.autograd.grad(expected_out, (x2, a2, b2), grad_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("owns_input", [False, True])
def test_gradcheck_against_finite_differences(owns_input):
    x, a, b = _inputs()
    product = lambda x, a, b: LoraDropoutProduct.apply(x, a, b, 0.7, 0.3, 5, None, owns_input)  # noqa: E731
    assert torch.autograd.gradcheck(product, (x, a, b))


def test_layer_training_step_uses_a_seeded_mask_and_matches_the_formula():
    holder = adapt_layer(nn.Linear(12, 7).double(), r=4, alpha=8, dropout=0.25)
    layer = holder.layer
    a, b = fill_(layer.lora_A["default"].weight, 1), fill_(layer.lora_B["default"].weight, 2)
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    holder.train()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    mask = dropout_mask(seed, x.shape, 0.25)
    w, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    expected = x @ w.t() + bias + 2.0 * (x * mask) @ a.detach().t() @ b.detach().t()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def _saved_bytes(run) -> int:
    """Bytes of distinct storages autograd keeps for the backward pass of `run()`."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def test_layers_sharing_an_input_save_it_once_and_no_dropped_copy():
    torch.manual_seed(0)
    layers = [adapt_layer(nn.Linear(64, 64), r=4, dropout=0.1).layer for _ in range(3)]
    for layer in layers:
        layer.train()
        layer.base_layer.weight.requires_grad_(False)
        layer.base_layer.bias.requires_grad_(False)
    x = torch.randn(8, 32, 64, requires_grad=True)
    saved = _saved_bytes(lambda: [layer(x) for layer in layers])
    weights = sum(
        t.nbytes
        for layer in layers
        for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight)
    )
    # x once (the plain path keeps a dropped copy and a mask per layer: 3 · (4 + 1) bytes per element),
    # plus each layer's r-wide product A·x and the weights the backward pass multiplies by.
    assert saved <= x.nbytes + 3 * 8 * 32 * 4 * 4 + weights


def test_a_layer_owning_its_input_saves_the_dropped_out_input_instead_of_x():
    torch.manual_seed(0)
    x = torch.randn(8, 32, 64, requires_grad=True)
    a = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(16, 4, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lora_dropout_product(x, a, b, 0.5, 0.1, owns_input=True)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert x.untyped_storage().data_ptr() not in storages
    input_sized = [t for t in saved if t.shape == x.shape]
    assert len(input_sized) == 1 and torch.equal(kept_elements(input_sized[0]), input_sized[0] != 0)
    assert sum(t.numel() for t in saved) == x.numel() + a.numel() + b.numel() + 8 * 32 * 4
    assert out.shape == (8, 32, 16)


def test_under_autocast_saves_the_input_uncopied_and_everything_in_the_compute_dtype():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 32, generator=g).to(torch.bfloat16).requires_grad_(True)
    a = torch.randn(4, 32, generator=g, requires_grad=True)  # float32 master factors
    b = torch.randn(16, 4, generator=g, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_dropout_product(x, a, b, 0.5, 0.1)
    assert out.dtype == torch.bfloat16
    assert {t.dtype for t in saved} == {torch.bfloat16}
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    grad_x, grad_a, grad_b = torch.autograd.grad(out.float().sum(), (x, a, b))
    assert (grad_x.dtype, grad_a.dtype, grad_b.dtype) == (torch.bfloat16, torch.float32, torch.float32)


def test_explicit_compute_dtype_matches_the_float64_formula_within_bf16_tolerance():
    x, a, b = _inputs()
    out = LoraDropoutProduct.apply(x, a, b, 1.5, 0.2, 123, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad(out, (x, a, b), grad_out.to(torch.bfloat16))
    x2, a2, b2 = _inputs()
    expected_out = 1.5 * (x2 * dropout_mask(123, x2.shape, 0.2)) @ a2.t() @ b2.t()
    want = torch.autograd.grad(expected_out, (x2, a2, b2), grad_out)
    assert max_relative_error(out.double(), expected_out.detach()) < 2e-2
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and max_relative_error(g, w) < 3e-2


@pytest.mark.parametrize("leading", [(6,), (3, 5), (2, 3, 4)])
def test_the_narrow_product_is_the_matrix_product_written_out(leading):
    """narrow_product(W, Nᵀ)[..., j] = Σ_k W[..., k]·N[k, j], summed here one term at a time in float64, in the
    transposed layout that makes the GEMM write r long rows; also for a transposed (non-contiguous) wide factor
    and a transposed narrow one."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(*leading, 10, generator=g, dtype=torch.float64)
    narrow = torch.randn(10, 3, generator=g, dtype=torch.float64)
    expected = sum(wide[..., k, None] * narrow[k] for k in range(10))
    for narrow_t in (narrow.t().contiguous(), narrow.t()):
        got = narrow_product(wide, narrow_t)
        assert got.shape == (*leading, 3) and torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
        assert got.reshape(-1, 3).stride() == (1, got.reshape(-1, 3).shape[0])  # each of the r columns contiguous
    flat = wide.reshape(-1, 10)
    column_sums = narrow_product(flat.t(), torch.ones(1, flat.shape[0], dtype=torch.float64))[:, 0]
    assert torch.allclose(column_sums, flat.sum(0))


def test_the_inference_product_is_the_training_product_without_dropout_bit_for_bit():
    """PiSSA / OLoRA subtract their frozen start with `low_rank_product` from the adapter's output, which is the
    fused function while gradients are recorded: the two must round alike for the model to start exactly as
    the base (scaling 4 here: no rounding in the scaling itself)."""
    x, a, b = (t.detach().float() for t in _inputs())
    fused = lora_dropout_product(x, a, b, 4.0, 0.0)
    assert torch.equal(fused, low_rank_product(x, a, b, 4.0))
    assert torch.allclose(fused.double(), 4.0 * (x.double() @ a.double().t()) @ b.double().t(), rtol=1e-5, atol=1e-5)
