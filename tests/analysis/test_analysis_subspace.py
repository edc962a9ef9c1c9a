"""Subspace similarity φ(A₁, A₂, i, j) on constructed factors whose singular vectors are planted, so every
φ(i, j) is known by hand: identical spans → 1, orthogonal → 0, planted partial overlaps → their fractions."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.analysis import random_baseline, singular_basis, subspace_similarity

N = 12  # ambient dimension (the layer's input size for A)


def _rotation(seed: int = 0) -> torch.Tensor:
    """A random orthogonal N × N matrix, so planted directions are not the coordinate axes."""
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _a_with(directions: torch.Tensor, singular_values: list[float], seed: int = 1) -> torch.Tensor:
    """An A (r × N) whose right-singular vectors are the columns of `directions`, in that order (the singular
    values are decreasing), with a random orthogonal left factor."""
    r = directions.shape[1]
    left, _ = torch.linalg.qr(torch.randn(r, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return left @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ directions.T


def test_identical_spans_give_one_everywhere():
    e = _rotation()
    a = _a_with(e[:, :4], [4, 3, 2, 1])
    # Same span in the same order, other scale and other left factor: φ(i, j) = min(i, j) / min(i, j) = 1.
    other = _a_with(e[:, :4], [40, 30, 20, 10], seed=7).to(torch.float32)
    phi = subspace_similarity(a, other)
    assert phi.shape == (4, 4) and phi.dtype == torch.float64
    torch.testing.assert_close(phi, torch.ones(4, 4, dtype=torch.float64))


def test_orthogonal_spans_give_zero():
    e = _rotation()
    phi = subspace_similarity(_a_with(e[:, :3], [3, 2, 1]), _a_with(e[:, 3:8], [5, 4, 3, 2, 1]))
    assert phi.shape == (3, 5)
    assert phi.abs().max() < 1e-12


def test_planted_partial_overlap_gives_known_fractions():
    e = _rotation()
    # A₁ reads (in order) e0, e1, e2, e3; A₂ reads e0, e4, e1, e5, e6, e7.
    first = _a_with(e[:, [0, 1, 2, 3]], [4, 3, 2, 1])
    second = _a_with(e[:, [0, 4, 1, 5, 6, 7]], [6, 5, 4, 3, 2, 1])
    phi = subspace_similarity(first, second)
    # φ(i, j) = |{first i of A₁} ∩ {first j of A₂}| / min(i, j), counted by hand.
    shared = {
        (i, j): len(set([0, 1, 2, 3][:i]) & set([0, 4, 1, 5, 6, 7][:j])) for i in range(1, 5) for j in range(1, 7)
    }
    expected = torch.tensor([[shared[i, j] / min(i, j) for j in range(1, 7)] for i in range(1, 5)], dtype=torch.float64)
    torch.testing.assert_close(phi, expected)
    assert phi[0, 0] == pytest.approx(1.0)  # the top direction is shared
    assert phi[1, 1] == pytest.approx(0.5)  # {e0, e1} vs {e0, e4}
    assert phi[3, 5] == pytest.approx(0.5)  # {e0..e3} vs {e0, e4, e1, e5, e6, e7}: 2 of 4


def test_angle_between_top_directions():
    e = _rotation()
    theta = 0.3
    tilted = math.cos(theta) * e[:, :1] + math.sin(theta) * e[:, 1:2]
    phi = subspace_similarity(_a_with(e[:, :1], [1.0]), _a_with(tilted, [2.0]))
    assert phi.item() == pytest.approx(math.cos(theta) ** 2, abs=1e-12)


def test_b_side_uses_left_singular_vectors():
    e = _rotation()
    # Bᵀ has the same shape as A, so B = Aᵀ plants its left-singular vectors.
    first = _a_with(e[:, [0, 1, 2]], [3, 2, 1]).T
    second = _a_with(e[:, [2, 5]], [2, 1]).T
    phi = subspace_similarity(first, second, factor="B")
    expected = torch.tensor([[0, 0], [0, 0], [1, 1 / 2]], dtype=torch.float64)  # e2 is A₁'s third, A₂'s first
    torch.testing.assert_close(phi, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(singular_basis(first, "B").abs(), e[:, [0, 1, 2]].abs(), atol=1e-12, rtol=0)


def test_random_spans_average_to_the_baseline():
    # E φ(i, j) = max(i, j) / n for random spans: the mean over 300 pairs of random A's in 64 dims.
    g = torch.Generator().manual_seed(3)
    grids = [subspace_similarity(torch.randn(4, 64, generator=g), torch.randn(8, 64, generator=g)) for _ in range(300)]
    mean = torch.stack(grids).mean(0)
    expected = torch.tensor(
        [[random_baseline(i, j, 64) for j in range(1, 9)] for i in range(1, 5)], dtype=torch.float64
    )
    torch.testing.assert_close(mean, expected, atol=0.01, rtol=0.1)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="different input spaces"):
        subspace_similarity(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError, match="factor must be one of"):
        subspace_similarity(torch.randn(2, 8), torch.randn(2, 8), factor="C")
    with pytest.raises(ValueError, match="expected a matrix"):
        subspace_similarity(torch.randn(2, 8, 1), torch.randn(2, 8))
