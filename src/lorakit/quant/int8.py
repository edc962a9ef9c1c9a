"""8-bit storage of a weight matrix, one scale per output row.

**Symmetric (absmax)**, as in the quantization lecture of the project's seeds: with s = 127 / max|w| a
value w is stored as round(w·s) in [-127, 127] and read back as q / s. For a row whose largest magnitude
is 7.8, s = 127/7.8 and -5.4 → -88, 6.4 → 104, 7.8 → 127. Zero maps to exactly zero; -128 is unused so
the range stays symmetric.

**Asymmetric (zero point)**: a row whose values are not centred on zero wastes half of the symmetric
range. Here the row's range [min, max] (widened to include 0, so 0 stays exact) is spread over all 256
levels: s = 255 / (max - min), z = round(-min·s), q = clamp(round(w·s) + z, 0, 255), w ≈ (q - z) / s.

Scales are per output row because a linear layer's rows differ in magnitude, and decoding a range of rows
(what `QuantLinear` needs) then touches only their own scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_QMAX = 127  # symmetric int8 range [-127, 127]
_LEVELS = 255  # asymmetric uint8 range [0, 255]


def _safe(denominator: torch.Tensor) -> torch.Tensor:
    # A row of zeros has no range; any finite scale then encodes it as exact zeros.
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def quantize_absmax(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit quantization of each row (last dimension): (int8 codes, fp32 scale s per row)."""
    w = weight.detach().to(torch.float32)
    scale = _QMAX / _safe(w.abs().amax(dim=-1))
    codes = torch.round(w * scale.unsqueeze(-1)).clamp(-_QMAX, _QMAX).to(torch.int8)
    return codes, scale


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes / s, row by row, in fp32."""
    return codes.to(torch.float32) / scale.to(torch.float32).unsqueeze(-1)


def quantize_zero_point(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 8-bit quantization of each row: (uint8 codes, fp32 scale s, uint8 zero point z)."""
    w = weight.detach().to(torch.float32)
    low = w.amin(dim=-1).clamp_max(0)
    high = w.amax(dim=-1).clamp_min(0)
    scale = _LEVELS / _safe(high - low)
    # low <= 0 <= high, so -low·s lies in [0, 255]: the zero point fits in a byte.
    zero = torch.round(-low * scale).clamp(0, _LEVELS)
    codes = (torch.round(w * scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, _LEVELS).to(torch.uint8)
    return codes, scale, zero.to(torch.uint8)


def dequantize_zero_point(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - z) / s, row by row, in fp32."""
    shifted = codes.to(torch.float32) - zero.to(torch.float32).unsqueeze(-1)
    return shifted / scale.to(torch.float32).unsqueeze(-1)


@dataclass(frozen=True)
class Int8Codec:
    """Per-row 8-bit storage for `QuantLinear`. Buffers: `weight_q` (int8, or uint8 with a zero point),
    `weight_scale` (fp32 per row) and, asymmetric only, `weight_zero_point` (uint8 per row)."""

    zero_point: bool = False

    @property
    def name(self) -> str:
        return "int8-asym" if self.zero_point else "int8"

    def spec(self) -> dict:
        return {"method": self.name}

    def empty(self, out_features: int, in_features: int, device=None) -> dict[str, torch.Tensor]:
        code_dtype = torch.uint8 if self.zero_point else torch.int8
        buffers = {
            "weight_q": torch.empty(out_features, in_features, dtype=code_dtype, device=device),
            "weight_scale": torch.empty(out_features, device=device),
        }
        if self.zero_point:
            buffers["weight_zero_point"] = torch.empty(out_features, dtype=torch.uint8, device=device)
        return buffers

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.zero_point:
            codes, scale, zero = quantize_zero_point(weight)
            return {"weight_q": codes, "weight_scale": scale, "weight_zero_point": zero}
        codes, scale = quantize_absmax(weight)
        return {"weight_q": codes, "weight_scale": scale}

    def decode_rows(
        self, buffers: dict[str, torch.Tensor], row_start: int, row_stop: int, in_features: int
    ) -> torch.Tensor:
        codes = buffers["weight_q"][row_start:row_stop]
        scale = buffers["weight_scale"][row_start:row_stop]
        if self.zero_point:
            return dequantize_zero_point(codes, scale, buffers["weight_zero_point"][row_start:row_stop])
        return dequantize_absmax(codes, scale)


__all__ = ["Int8Codec", "dequantize_absmax", "dequantize_zero_point", "quantize_absmax", "quantize_zero_point"]
