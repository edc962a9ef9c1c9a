"""4-bit NormalFloat (NF4) storage of a weight matrix, as introduced by QLoRA (Dettmers et al., 2023).

Pretrained weights are roughly normal, so NF4 places its 16 levels at quantiles of N(0, 1) instead of
evenly: each level then covers about the same share of the weights, which lowers the error for the same
4 bits. Three ideas make up the format:

1. **The code book** (`nf4_code`): 16 values in [-1, 1] with an exact 0 (padding, zero rows and sparse
   weights must stay exactly 0). With 16 levels and a zero, the two sides cannot be symmetric: there are
   8 positive and 7 negative levels, each side the normal quantiles of an evenly spaced grid of
   probabilities from 1/2 up to a cut-off `_TAIL`, then scaled so that the largest magnitude is 1.
2. **Blockwise absmax scaling**: the flattened weight is cut into blocks of 64 values; each block is
   divided by its largest magnitude (its *absmax*, kept in fp32), so one outlier only degrades its own
   block. Each normalised value is replaced by the index of the nearest code value; two 4-bit indices
   share one byte. A matrix whose size is not a multiple of the block size is zero-padded at the end.
3. **Double quantization** (`double_quantize`): the fp32 absmax constants (32 bits per 64 weights = 0.5
   bit per weight) are themselves quantized to int8 in blocks of 256, after subtracting their mean (they
   are all positive, so centring them uses the int8 range on both sides). That costs 8/64 + 32/(64·256)
   bits per weight, bringing the total from 4.5 to about 4.127 bits.

Everything here is plain PyTorch on flat tensors and works on any device. `NF4Codec` ties the pieces
together for `QuantLinear`: which buffers a matrix needs, how to fill them, and how to decode a range of
rows (decoding is always partial, so a whole float copy of the weight never has to exist).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

BLOCK_SIZE = 64
DQ_BLOCK_SIZE = 256
# Probability cut-off of the outermost level: halfway between 1 - 1/(2·15) and 1 - 1/(2·16). The
# quantile function is infinite at 1, so the grid has to stop short of it; this choice (the paper's)
# reproduces the published NF4 values.
_TAIL = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
# Values quantized per pass when encoding: bounds the temporaries of a large matrix to a few tens of MB.
_ENCODE_CHUNK = 1 << 21


def nf4_code(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels, ascending, from -1 to 1 with an exact 0 at index 7."""
    grid_pos = torch.linspace(_TAIL, 0.5, 9, dtype=torch.float64)[:-1]  # 8 probabilities > 1/2
    grid_neg = torch.linspace(_TAIL, 0.5, 8, dtype=torch.float64)[:-1]  # 7 probabilities > 1/2
    levels = (
        torch.cat(
            [
                torch.special.ndtri(grid_pos),  # positive side
                -torch.special.ndtri(grid_neg),  # negative side (mirrored quantiles)
                torch.zeros(1, dtype=torch.float64),
            ]
        )
        .sort()
        .values
    )
    return (levels / levels.abs().max()).to(dtype=dtype, device=device)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between neighbouring levels: a value maps to the level whose interval holds it."""
    return (code[1:] + code[:-1]) / 2


_CELLS = 1024  # uniform cells over [-1, 1] for the level search; each holds at most one boundary


@functools.lru_cache(maxsize=8)
def _search_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first candidate level per cell, boundaries padded with +inf) for `_nearest_level`."""
    bounds = _midpoints(nf4_code())
    starts = -1 + 2 * torch.arange(_CELLS + 1, dtype=torch.float64) / _CELLS
    # Boundaries strictly below each cell's start, with a margin far above float rounding and far below the
    # smallest gap between boundaries (0.08): a value in the cell has at most one more boundary below it.
    first = (bounds.double()[None, :] < starts[:, None] - 1e-4).sum(dim=1).to(torch.int32)
    padded = torch.cat([bounds, torch.tensor([float("inf")])])
    return first.to(device), padded.to(device)


def _nearest_level(normalised: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest NF4 level for values in [-1, 1]: the number of boundaries below each
    value, as `torch.bucketize(normalised, boundaries)` gives, but through a table of uniform cells and one
    comparison (a binary search per value is about 4× slower on CPU)."""
    first, bounds = _search_tables(normalised.device)
    cell = ((normalised + 1) * (_CELLS / 2)).to(torch.int32).clamp_(0, _CELLS).view(-1)
    candidate = first.index_select(0, cell)
    above = normalised.view(-1) > bounds.index_select(0, candidate)
    return (candidate + above).to(torch.uint8).view(normalised.shape)


@functools.lru_cache(maxsize=8)
def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) table: byte value → its two decoded levels (high nibble first). Decoding one byte with one
    lookup avoids separate shift/mask passes and int64 nibble indices over the whole matrix. Cached per
    device: the forward decodes every layer at every step."""
    code = nf4_code(device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def padded_numel(numel: int, block_size: int = BLOCK_SIZE) -> int:
    return math.ceil(numel / block_size) * block_size


# -- blockwise quantization -------------------------------------------------------------------------
def quantize_blocks(flat: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a flat tensor to NF4: (packed uint8 of padded_numel/2 bytes, fp32 absmax per block).

    The tail is zero-padded to whole blocks. Encoding runs in chunks so the temporaries stay small.
    """
    if block_size % 2:
        raise ValueError(f"block size must be even (two codes per byte), got {block_size}")
    flat = flat.reshape(-1)
    total = padded_numel(flat.numel(), block_size)
    n_blocks = total // block_size
    packed = torch.empty(total // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    step = max(1, _ENCODE_CHUNK // block_size) * block_size
    for start in range(0, total, step):
        stop = min(start + step, total)
        piece = flat[start : min(stop, flat.numel())].to(torch.float32)
        if piece.numel() < stop - start:  # the last chunk: pad with zeros to whole blocks
            piece = torch.cat([piece, piece.new_zeros(stop - start - piece.numel())])
        blocks = piece.view(-1, block_size)
        block_max = blocks.abs().amax(dim=1)
        # An all-zero block keeps absmax 0 but is divided by 1: its values all land on the exact-zero level.
        normalised = blocks / torch.where(block_max > 0, block_max, 1.0)[:, None]
        index = _nearest_level(normalised).view(-1)
        packed[start // 2 : stop // 2] = (index[0::2] << 4) | index[1::2]
        absmax[start // block_size : stop // block_size] = block_max
    return packed, absmax


def dequantize_blocks(packed: torch.Tensor, absmax: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Decode whole blocks: packed bytes (block_size/2 per block) and one absmax per block → fp32, flat."""
    levels = _pair_table(packed.device).index_select(0, packed.to(torch.int32))  # (bytes, 2)
    return (levels.view(-1, block_size) * absmax.to(torch.float32)[:, None]).view(-1)


# -- double quantization of the absmax constants ---------------------------------------------------
def double_quantize(
    absmax: torch.Tensor, block_size: int = DQ_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax (fp32) → (int8 codes, one fp32 scale per block of `block_size`, fp32 mean as a 0-d tensor).

    Symmetric int8 absmax quantization of `absmax - mean`, blockwise so one large constant does not
    coarsen the others: code = round((a - mean) / step), step = max|a - mean| / 127 per block.
    """
    absmax = absmax.to(torch.float32).reshape(-1)
    mean = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    centred = absmax - mean
    pad = padded_numel(centred.numel(), block_size) - centred.numel()
    blocks = torch.cat([centred, centred.new_zeros(pad)]).view(-1, block_size)
    step = blocks.abs().amax(dim=1) / 127
    codes = torch.round(blocks / torch.where(step > 0, step, 1.0)[:, None]).clamp(-127, 127).to(torch.int8)
    # clone: a slice would keep the padded storage alive (and be counted, and saved, with it).
    return codes.view(-1)[: absmax.numel()].clone(), step, mean.reshape(())


def double_dequantize(
    codes: torch.Tensor,
    step: torch.Tensor,
    mean: torch.Tensor,
    start: int = 0,
    stop: int | None = None,
    block_size: int = DQ_BLOCK_SIZE,
) -> torch.Tensor:
    """The absmax constants of blocks [start, stop) recovered from their int8 codes."""
    stop = codes.numel() if stop is None else stop
    owner = torch.arange(start, stop, device=codes.device) // block_size  # which scale each constant uses
    values = codes[start:stop].to(torch.float32) * step.to(torch.float32)[owner] + mean.to(torch.float32)
    # A constant is a magnitude: rounding must not turn a near-zero one negative (that would flip signs).
    return values.clamp_min(0)


# -- a matrix in NF4, as QuantLinear stores it -------------------------------------------------------
@dataclass(frozen=True)
class NF4Codec:
    """NF4 storage of an (out × in) matrix: the flattened rows, blockwise, optionally double-quantized.

    Buffers: `weight_packed` (uint8), and either `absmax` (fp32 per block) or, with double quantization,
    `absmax_q` (int8 per block), `absmax_scale` (fp32 per 256 blocks) and `absmax_mean` (fp32 scalar).
    """

    block_size: int = BLOCK_SIZE
    double_quant: bool = True
    dq_block_size: int = DQ_BLOCK_SIZE

    @property
    def name(self) -> str:
        return "nf4"

    def spec(self) -> dict:
        return {
            "method": "nf4",
            "block_size": self.block_size,
            "double_quant": self.double_quant,
            "dq_block_size": self.dq_block_size,
        }

    def empty(self, out_features: int, in_features: int, device=None) -> dict[str, torch.Tensor]:
        """Buffers of the right shapes, uninitialised (to be filled by `load_state_dict`)."""
        n_blocks = padded_numel(out_features * in_features, self.block_size) // self.block_size
        buffers = {"weight_packed": torch.empty(n_blocks * self.block_size // 2, dtype=torch.uint8, device=device)}
        if self.double_quant:
            buffers["absmax_q"] = torch.empty(n_blocks, dtype=torch.int8, device=device)
            buffers["absmax_scale"] = torch.empty(math.ceil(n_blocks / self.dq_block_size), device=device)
            buffers["absmax_mean"] = torch.empty((), device=device)
        else:
            buffers["absmax"] = torch.empty(n_blocks, device=device)
        return buffers

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, absmax = quantize_blocks(weight.detach(), self.block_size)
        if not self.double_quant:
            return {"weight_packed": packed, "absmax": absmax}
        codes, step, mean = double_quantize(absmax, self.dq_block_size)
        return {"weight_packed": packed, "absmax_q": codes, "absmax_scale": step, "absmax_mean": mean}

    def block_absmax(self, buffers: dict[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        if self.double_quant:
            return double_dequantize(
                buffers["absmax_q"], buffers["absmax_scale"], buffers["absmax_mean"], start, stop, self.dq_block_size
            )
        return buffers["absmax"][start:stop]

    def decode_rows(
        self, buffers: dict[str, torch.Tensor], row_start: int, row_stop: int, in_features: int
    ) -> torch.Tensor:
        """fp32 rows [row_start, row_stop) of the matrix. Only the blocks overlapping them are decoded
        (rows and blocks need not align when in_features is not a multiple of the block size)."""
        first, last = row_start * in_features, row_stop * in_features
        b0, b1 = first // self.block_size, math.ceil(last / self.block_size)
        half = self.block_size // 2
        flat = dequantize_blocks(
            buffers["weight_packed"][b0 * half : b1 * half], self.block_absmax(buffers, b0, b1), self.block_size
        )
        offset = b0 * self.block_size
        return flat[first - offset : last - offset].view(row_stop - row_start, in_features)


__all__ = [
    "BLOCK_SIZE",
    "DQ_BLOCK_SIZE",
    "NF4Codec",
    "dequantize_blocks",
    "double_dequantize",
    "double_quantize",
    "nf4_code",
    "padded_numel",
    "quantize_blocks",
]
