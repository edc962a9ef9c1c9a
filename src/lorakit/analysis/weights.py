"""How the update ΔW relates to the pretrained weight W (the LoRA paper, Section 7.3 and Table 7).

For r directions given by U (out × r, orthonormal columns) and V (r × in, orthonormal rows), ‖UᵀWVᵀ‖_F is
how much of W lies in them. It is taken for the top-r singular directions of ΔW, of W itself, and of a random
matrix; the amplification factor ‖ΔW‖_F / ‖U_ΔᵀWV_Δᵀ‖_F says how strongly ΔW boosts directions that W
already has (a large factor: ΔW amplifies directions W holds only weakly). All in float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .spectrum import SVD

_NEGLIGIBLE = 1e-12


@dataclass(frozen=True)
class DeltaVsWeight:
    """One layer's row of Table 7. `amplification` is None when ΔW's directions miss W entirely."""

    rank: int
    delta_norm: float  # ‖ΔW‖_F
    weight_norm: float  # ‖W‖_F
    projection_delta: float  # ‖UᵀWVᵀ‖_F, U, V: top-r singular directions of ΔW
    projection_weight: float  # ... of W (= the root sum of W's r largest squared singular values)
    projection_random: float  # ... of a random matrix
    amplification: float | None  # ‖ΔW‖_F / projection_delta

    def to_dict(self) -> dict:
        return asdict(self)


def projection_norm(weight: torch.Tensor, u: torch.Tensor, vh: torch.Tensor) -> float:
    """‖Uᵀ W Vᵀ‖_F for W (out × in), U (out × r) and V (r × in)."""
    if u.shape[0] != weight.shape[0] or vh.shape[1] != weight.shape[1]:
        raise ValueError(f"directions {tuple(u.shape)} / {tuple(vh.shape)} do not fit a {tuple(weight.shape)} weight")
    w = weight.detach().to(torch.float64)
    return float(torch.linalg.matrix_norm(u.to(torch.float64).T @ w @ vh.to(torch.float64).T))


def random_directions(
    shape: tuple[int, int], r: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) uniformly distributed r-frames for an (out × in) matrix. The top-r singular vectors of a Gaussian
    matrix are distributed exactly so (rotation invariance); the QR of Gaussian frames draws them for less."""
    out_dim, in_dim = shape
    u, _ = torch.linalg.qr(torch.randn(out_dim, r, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_dim, r, generator=generator, dtype=torch.float64))
    return u, v.T


def delta_vs_weight(
    delta: SVD, weight: torch.Tensor, rank: int | None = None, generator: torch.Generator | None = None
) -> DeltaVsWeight:
    """Table 7's quantities for one layer: `delta` is the SVD of ΔW (from `delta_svd`), `weight` W in the same
    (out × in) layout; `rank` (default: all of ΔW's singular directions, i.e. the adapter's r) sets r."""
    r = rank if rank is not None else delta.s.numel()
    if not 0 < r <= delta.s.numel():
        raise ValueError(f"rank must be in 1..{delta.s.numel()}, got {r}")
    if (delta.u.shape[0], delta.vh.shape[1]) != tuple(weight.shape):
        raise ValueError(f"ΔW is {delta.u.shape[0]} × {delta.vh.shape[1]} but W is {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    w_u, w_s, w_vh = torch.linalg.svd(w, full_matrices=False)
    delta_norm = float(delta.s.norm())
    weight_norm = float(torch.linalg.matrix_norm(w))
    on_delta = projection_norm(w, delta.u[:, :r], delta.vh[:r])
    # Below rounding level relative to W, "W has nothing in ΔW's directions": no finite factor.
    misses = on_delta <= _NEGLIGIBLE * weight_norm
    return DeltaVsWeight(
        rank=r,
        delta_norm=delta_norm,
        weight_norm=weight_norm,
        projection_delta=on_delta,
        projection_weight=projection_norm(w, w_u[:, :r], w_vh[:r]),
        projection_random=projection_norm(w, *random_directions((w.shape[0], w.shape[1]), r, generator)),
        amplification=None if misses else delta_norm / on_delta,
    )


__all__ = ["DeltaVsWeight", "delta_vs_weight", "projection_norm", "random_directions"]
