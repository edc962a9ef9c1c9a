"""8-bit quantization against the seeds' worked example (symmetric absmax) and the zero-point formulas
written out by hand (asymmetric), plus error bounds, zero rows and partial row decoding."""

from __future__ import annotations

import torch

from lorakit.quant.int8 import (
    Int8Codec,
    dequantize_absmax,
    dequantize_zero_point,
    quantize_absmax,
    quantize_zero_point,
)


def test_absmax_reproduces_the_lecture_example():
    # Seeds' quantization lecture: max |w| = 7.8, s = 127/7.8.
    row = torch.tensor([[-5.4, -3.8, -1.2, 0.3, 6.4, 7.8, 7.77]])
    codes, scale = quantize_absmax(row)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[-88, -62, -20, 5, 104, 127, 127]]
    assert scale.item() == torch.tensor(127 / 7.8, dtype=torch.float32).item()
    decoded = dequantize_absmax(codes, scale)
    torch.testing.assert_close(decoded, codes.float() / (127 / 7.8))
    assert abs(decoded[0, 5].item() - 7.8) < 1e-6  # 127 / s


def test_absmax_is_per_row_and_within_half_a_step():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 50, generator=generator) * torch.tensor([0.01, 0.1, 1, 10, 100, 1000])[:, None]
    codes, scale = quantize_absmax(weight)
    assert torch.allclose(scale, 127 / weight.abs().amax(dim=1))
    assert torch.all(codes.abs().amax(dim=1) == 127)  # every row uses its full range
    error = (dequantize_absmax(codes, scale) - weight).abs()
    assert torch.all(error <= 0.5 / scale[:, None] * (1 + 1e-5))


def test_zero_rows_quantize_to_zeros_without_nan():
    weight = torch.zeros(2, 5)
    weight[1] = torch.tensor([0.0, 1.0, -2.0, 0.5, 0.0])
    codes, scale = quantize_absmax(weight)
    decoded = dequantize_absmax(codes, scale)
    assert torch.isfinite(scale).all() and torch.all(decoded[0] == 0)
    codes, scale, zero = quantize_zero_point(weight)
    decoded = dequantize_zero_point(codes, scale, zero)
    assert torch.isfinite(decoded).all() and torch.all(decoded[0] == 0)


def test_zero_point_matches_the_formula_by_hand():
    # s = 255 / (max - min) = 255/4 = 63.75; z = round(1 · 63.75) = 64.
    row = torch.tensor([[-1.0, 0.0, 2.0, 3.0]])
    codes, scale, zero = quantize_zero_point(row)
    assert codes.dtype == torch.uint8 and zero.dtype == torch.uint8
    assert scale.item() == 63.75 and zero.item() == 64
    # -1 → -63.75 → -64 + 64 = 0;  0 → 64;  2 → 127.5 → 128 (half to even) + 64 = 192;  3 → 191.25 → 191 + 64 = 255
    assert codes.tolist() == [[0, 64, 192, 255]]
    decoded = dequantize_zero_point(codes, scale, zero)
    torch.testing.assert_close(decoded, (codes.float() - 64) / 63.75)
    assert decoded[0, 1] == 0  # zero is exact


def test_zero_point_beats_symmetric_on_one_sided_rows():
    generator = torch.Generator().manual_seed(1)
    weight = torch.rand(8, 256, generator=generator) + 0.5  # all positive, in [0.5, 1.5)
    sym_error = (dequantize_absmax(*quantize_absmax(weight)) - weight).abs().max()
    asym_error = (dequantize_zero_point(*quantize_zero_point(weight)) - weight).abs().max()
    assert asym_error < 0.6 * sym_error
    low = weight.amin(dim=1).clamp_max(0)
    high = weight.amax(dim=1)
    assert asym_error <= ((high - low) / 255 / 2).max() * (1 + 1e-5)


def test_codec_decodes_row_ranges_like_the_whole_matrix():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(7, 33, generator=generator)
    for codec in (Int8Codec(), Int8Codec(zero_point=True)):
        stored = codec.encode(weight)
        assert set(stored) == set(codec.empty(7, 33, "meta"))
        whole = codec.decode_rows(stored, 0, 7, 33)
        torch.testing.assert_close(codec.decode_rows(stored, 2, 5, 33), whole[2:5], rtol=0, atol=0)
        assert (whole - weight).abs().max() < weight.abs().max() / 127
