"""The singular values of a LoRA update ΔW = s·B·A, and how many of them matter.

`delta_svd` gets the exact thin SVD of s·B·A from its factors (QR of B and of Aᵀ, then an r × r SVD), so a
4096 × 11008 update costs an SVD of its rank, not of its size. All results are float64.

Two effective ranks of a spectrum σ₁ ≥ σ₂ ≥ … ≥ 0:
- entropy rank (Roy & Vetterli, 2007): exp(−Σ pᵢ ln pᵢ) with pᵢ = σᵢ / Σσ; k equal singular values give k.
- energy rank: the fewest leading singular values whose squares hold a given fraction (90 %) of ‖ΔW‖²_F.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Relative slack for the energy threshold: a spectrum whose first k values hold exactly 90 % in exact
# arithmetic must not need k + 1 because of rounding.
_ENERGY_TOLERANCE = 1e-12


class SVD(NamedTuple):
    """M = u · diag(s) · vh, singular values in decreasing order; u (out × k), s (k,), vh (k × in)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def delta_svd(b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0) -> SVD:
    """The thin SVD of scaling · B · A, in float64, for B (out × r) and A (r × in) with r ≤ min(out, in)."""
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"B {tuple(b.shape)} and A {tuple(a.shape)} are not the factors of a matrix product")
    if b.shape[1] > min(b.shape[0], a.shape[1]):
        raise ValueError(f"rank {b.shape[1]} exceeds min(out, in) = {min(b.shape[0], a.shape[1])}")
    q_b, r_b = torch.linalg.qr(b.detach().to(torch.float64))
    q_a, r_a = torch.linalg.qr(a.detach().to(torch.float64).T)
    # B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ with orthonormal Q's: the SVD of the small core gives that of the product.
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return SVD(q_b @ u, s * abs(scaling), vh @ q_a.T)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's entropy rank exp(H(σ / Σσ)); 0 for an all-zero spectrum."""
    s = singular_values.detach().to(torch.float64).clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(singular_values: torch.Tensor, fraction: float = 0.9) -> int:
    """The fewest leading singular values whose squares hold `fraction` of the total energy Σσ²."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    energy = singular_values.detach().to(torch.float64).sort(descending=True).values ** 2
    total = float(energy.sum())
    if total <= 0:
        return 0
    held = energy.cumsum(0) / total
    return int((held < fraction * (1 - _ENERGY_TOLERANCE)).sum()) + 1


__all__ = ["SVD", "delta_svd", "effective_rank", "energy_rank"]
