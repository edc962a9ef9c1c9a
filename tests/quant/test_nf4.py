"""NF4 against independent references: the code book from the QLoRA paper and from scipy's normal quantiles,
blockwise quantization re-implemented with a brute-force nearest-level search, error bounds on N(0, 1)
data, packing, padding, and the storage cost of double quantization measured from the stored tensors."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm

from lorakit.quant.nf4 import (
    NF4Codec,
    dequantize_blocks,
    double_dequantize,
    double_quantize,
    nf4_code,
    quantize_blocks,
)

# NF4 as printed in the QLoRA paper (Dettmers et al. 2023, appendix E).
PAPER_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def _scipy_code() -> torch.Tensor:
    """The construction of the paper with scipy: 8 positive and 7 negative normal quantiles of evenly
    spaced probabilities from the cut-off δ down to 1/2 (exclusive), an exact zero, scaled to [-1, 1]."""
    delta = 0.5 * (1 - 1 / 30 + 1 - 1 / 32)
    positive = [norm.ppf(p) for p in torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1].tolist()]
    negative = [-norm.ppf(p) for p in torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1].tolist()]
    values = torch.tensor(sorted(positive + negative + [0.0]), dtype=torch.float64)
    return values / values.abs().max()


def _reference_roundtrip(flat: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Blockwise absmax NF4 written out plainly: pad, scale by each block's max |x|, pick the nearest of
    the paper's 16 levels by exhaustive search, scale back."""
    code = torch.tensor(PAPER_NF4, dtype=torch.float64)
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat.double(), flat.new_zeros(pad, dtype=torch.float64)]).view(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    nearest = (scaled.unsqueeze(-1) - code).abs().argmin(dim=-1)
    return (code[nearest] * absmax).view(-1)[: flat.numel()]


def test_code_book_is_the_papers_and_scipys():
    code = nf4_code(torch.float64)
    assert code.shape == (16,)
    torch.testing.assert_close(code, torch.tensor(PAPER_NF4, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(code, _scipy_code(), rtol=0, atol=1e-12)
    assert code[7] == 0 and code[0] == -1 and code[-1] == 1
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7
    assert torch.all(code[1:] > code[:-1])


def test_blockwise_roundtrip_equals_the_plain_reference():
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(64 * 40 + 17, generator=generator)  # not a multiple of the block size: padding
    flat[5] = 0.0
    packed, absmax = quantize_blocks(flat)
    assert packed.dtype == torch.uint8 and packed.numel() == 41 * 32 and absmax.numel() == 41
    decoded = dequantize_blocks(packed, absmax)[: flat.numel()]
    reference = _reference_roundtrip(flat).float()
    torch.testing.assert_close(decoded, reference, rtol=1e-6, atol=1e-6)
    assert decoded[5] == 0  # zero stays exactly zero
    assert torch.all(dequantize_blocks(packed, absmax)[flat.numel() :] == 0)  # padding decodes to zeros


def test_error_on_normal_data_is_within_the_bound_and_below_uniform_4bit():
    generator = torch.Generator().manual_seed(1)
    flat = torch.randn(1 << 18, generator=generator)
    packed, absmax = quantize_blocks(flat)
    decoded = dequantize_blocks(packed, absmax)
    error = (decoded - flat).abs()
    # Hard bound per value: half the widest gap between neighbouring levels, times the block's absmax.
    code = torch.tensor(PAPER_NF4)
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    assert half_gap == pytest.approx(0.1519, abs=1e-4)
    per_value_bound = half_gap * absmax.repeat_interleave(64)
    assert torch.all(error <= per_value_bound + 1e-6)
    # On N(0, 1) the normal-quantile levels beat evenly spaced 4-bit levels (15 levels incl. 0, absmax).
    blocks = flat.view(-1, 64)
    block_max = blocks.abs().amax(dim=1, keepdim=True)
    uniform = (torch.round(blocks / block_max * 7) / 7 * block_max).view(-1)
    nf4_rmse = error.pow(2).mean().sqrt().item()
    uniform_rmse = (uniform - flat).pow(2).mean().sqrt().item()
    assert nf4_rmse < 0.9 * uniform_rmse
    assert nf4_rmse < 0.1  # measured 0.092 of the unit standard deviation


def test_two_codes_per_byte_high_nibble_first():
    code = nf4_code()
    indices = torch.tensor([15, 0, 7, 3, 12, 9] + [7] * 58)
    packed, absmax = quantize_blocks(code[indices])  # exact levels in a block whose absmax is 1
    assert absmax.tolist() == [1.0]
    expected = [(int(a) << 4) | int(b) for a, b in zip(indices[0::2], indices[1::2])]
    assert packed.tolist() == expected
    torch.testing.assert_close(dequantize_blocks(packed, absmax), code[indices], rtol=0, atol=0)


def test_all_zero_input_decodes_to_exact_zeros():
    packed, absmax = quantize_blocks(torch.zeros(130))
    assert torch.all(absmax == 0)
    assert torch.all(dequantize_blocks(packed, absmax) == 0)


def test_double_quantization_matches_the_plain_reference():
    generator = torch.Generator().manual_seed(2)
    absmax = torch.rand(256 * 3 + 10, generator=generator) * 0.1 + 0.02
    codes, step, mean = double_quantize(absmax)
    assert codes.dtype == torch.int8 and step.numel() == 4 and mean.dim() == 0
    # Reference: subtract the mean, then symmetric int8 absmax per block of 256.
    centred = absmax.double() - absmax.double().mean()
    expected = torch.empty_like(centred)
    for start in range(0, centred.numel(), 256):
        block = centred[start : start + 256]
        s = 127 / block.abs().max()
        expected[start : start + 256] = torch.round(block * s) / s
    expected += absmax.double().mean()
    decoded = double_dequantize(codes, step, mean)
    torch.testing.assert_close(decoded.double(), expected, rtol=0, atol=1e-6)
    # Rounding error: at most half a step of each block.
    bound = step.repeat_interleave(256)[: absmax.numel()] / 2 + 1e-7
    assert torch.all((decoded - absmax).abs() <= bound)
    # A block range decodes like the same slice of the whole.
    torch.testing.assert_close(double_dequantize(codes, step, mean, 250, 600), decoded[250:600])


def test_bits_per_parameter_with_double_quantization_on_4096_square():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(4096, 4096, generator=generator) * 0.02
    stored = NF4Codec(double_quant=True).encode(weight)
    bits = 8 * sum(t.untyped_storage().nbytes() for t in stored.values()) / weight.numel()
    assert bits <= 4.13
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)  # 4.127
    plain = NF4Codec(double_quant=False).encode(weight)
    assert 8 * sum(t.untyped_storage().nbytes() for t in plain.values()) / weight.numel() == pytest.approx(4.5)
    # Double quantization costs little accuracy: the weight error grows by under 1 %.
    rows = NF4Codec(double_quant=True).decode_rows(stored, 0, 4096, 4096)
    rows_plain = NF4Codec(double_quant=False).decode_rows(plain, 0, 4096, 4096)
    dq_error, plain_error = (rows - weight).norm().item(), (rows_plain - weight).norm().item()
    assert dq_error < 1.01 * plain_error


def test_decoding_rows_that_straddle_blocks():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(9, 37, generator=generator)  # 37 columns: rows start in the middle of blocks
    codec = NF4Codec()
    stored = codec.encode(weight)
    whole = codec.decode_rows(stored, 0, 9, 37)
    for start, stop in [(0, 1), (1, 4), (3, 9), (8, 9)]:
        torch.testing.assert_close(codec.decode_rows(stored, start, stop, 37), whole[start:stop], rtol=0, atol=0)
    assert (whole - weight).abs().max() < 0.16 * weight.abs().max()


def test_level_search_agrees_with_a_binary_search_at_the_boundaries():
    from lorakit.quant.nf4 import _midpoints, _nearest_level

    bounds = _midpoints(nf4_code())
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    values = torch.cat(
        [
            torch.rand(100_000, generator=torch.Generator().manual_seed(5)) * 2 - 1,
            bounds,
            torch.nextafter(bounds, up),
            torch.nextafter(bounds, down),
            torch.tensor([-1.0, 0.0, 1.0]),
        ]
    )
    assert torch.equal(_nearest_level(values).long(), torch.bucketize(values, bounds))
