"""Subspace similarity between two adapters' factors (the LoRA paper, Section 7.2):

    φ(A₁, A₂, i, j) = ‖U_{A₁}^{i}ᵀ U_{A₂}^{j}‖²_F / min(i, j)   for 1 ≤ i ≤ r₁, 1 ≤ j ≤ r₂,

where U_A^i holds the top-i right-singular vectors of A (r × in), i.e. the input directions the adapter reads.
φ is 1 when one span contains the other, 0 when they are orthogonal, and in between the fraction of the
smaller span that lies in the larger. The same on the output side uses the left-singular vectors of
B (out × r). Two random spans of dimensions i and j in n dimensions give max(i, j) / n on average.
"""

from __future__ import annotations

import torch

FACTORS = ("A", "B")


def singular_basis(factor: torch.Tensor, which: str = "A") -> torch.Tensor:
    """Orthonormal columns, in order of decreasing singular value: the right-singular vectors of an A (r × in),
    or the left-singular vectors of a B (out × r). float64."""
    if which not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {which!r}")
    if factor.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(factor.shape)}")
    matrix = factor.detach().to(torch.float64)
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return vh.T if which == "A" else u


def subspace_similarity(first: torch.Tensor, second: torch.Tensor, factor: str = "A") -> torch.Tensor:
    """φ for every (i, j): an r₁ × r₂ float64 grid whose entry [i − 1, j − 1] is φ(i, j).

    `first` and `second` are two adapters' A matrices (r × in, same in) with factor="A", or their B matrices
    (out × r, same out) with factor="B".
    """
    u1, u2 = singular_basis(first, factor), singular_basis(second, factor)
    if u1.shape[0] != u2.shape[0]:
        side = "input" if factor == "A" else "output"
        raise ValueError(
            f"the two {factor} matrices live in different {side} spaces ({u1.shape[0]} vs {u2.shape[0]} dims)"
        )
    overlap = (u1.T @ u2) ** 2
    # ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F is the sum of the top-left i × j block of the squared overlaps.
    blocks = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return blocks / torch.minimum(i, j)


def random_baseline(i: int, j: int, dim: int) -> float:
    """E φ(i, j) for two uniformly random subspaces of dimensions i and j in `dim` dimensions: max(i, j) / dim
    (E‖U_iᵀU_j‖²_F = i·j / dim)."""
    return max(i, j) / dim


__all__ = ["FACTORS", "random_baseline", "singular_basis", "subspace_similarity"]
