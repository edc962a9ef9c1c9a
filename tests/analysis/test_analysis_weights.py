"""ΔW vs W (the LoRA paper's Table 7) on a W with a planted SVD, so ‖UᵀWVᵀ‖_F along any of its singular
directions is known exactly, and the random-direction baseline against its expectation r²/(out·in)·‖W‖²_F."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.analysis import delta_svd, delta_vs_weight, projection_norm, random_directions

OUT, IN = 10, 8
W_SINGULAR = [9.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25]


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.fixture
def planted():
    """W = P diag(w) Qᵀ with known P (10 × 8), w, Q (8 × 8)."""
    p, q = _orthonormal(OUT, IN, 0), _orthonormal(IN, IN, 1)
    w = torch.tensor(W_SINGULAR, dtype=torch.float64)
    return p, w, q, p @ torch.diag(w) @ q.T


def _delta_along(p, q, columns, values, scaling=1.0):
    """A LoRA update whose singular directions are W's own, at `columns`, with singular values `values`."""
    b = p[:, columns] * torch.tensor(values, dtype=torch.float64)
    a = q[:, columns].T
    return delta_svd(b, a, scaling)


def test_update_along_weak_directions_of_w(planted):
    p, w, q, weight = planted
    # ΔW along W's 3rd and 4th directions (singular values 5 and 3), ‖ΔW‖_F = √(6² + 8²) = 10.
    row = delta_vs_weight(_delta_along(p, q, [2, 3], [6.0, 8.0]), weight)
    assert row.rank == 2
    assert row.delta_norm == pytest.approx(10.0)
    assert row.weight_norm == pytest.approx(math.sqrt(sum(v * v for v in W_SINGULAR)))
    assert row.projection_delta == pytest.approx(math.hypot(5.0, 3.0))  # UᵀWVᵀ = diag(5, 3)
    assert row.projection_weight == pytest.approx(math.hypot(9.0, 7.0))  # W's own top-2
    assert row.amplification == pytest.approx(10.0 / math.hypot(5.0, 3.0))


def test_update_along_top_directions_equals_w_projection(planted):
    p, w, q, weight = planted
    row = delta_vs_weight(_delta_along(p, q, [0, 1, 2], [1.0, 0.5, 0.25], scaling=4.0), weight)
    assert row.projection_delta == pytest.approx(row.projection_weight)
    assert row.projection_weight == pytest.approx(math.sqrt(81 + 49 + 25))
    assert row.delta_norm == pytest.approx(4 * math.sqrt(1 + 0.25 + 0.0625))


def test_mismatched_directions_project_to_cross_terms(planted):
    p, w, q, weight = planted
    # Left direction p₀ paired with right direction q₁: uᵀWv = p₀ᵀ P diag(w) Qᵀ q₁ = 0.
    b, a = p[:, :1], q[:, 1:2].T
    row = delta_vs_weight(delta_svd(b, a), weight)
    assert row.projection_delta == pytest.approx(0.0, abs=1e-12)
    assert row.amplification is None  # ΔW's directions miss W: no finite factor


def test_rank_option_takes_the_top_directions(planted):
    p, w, q, weight = planted
    delta = _delta_along(p, q, [4, 0], [3.0, 1.0])  # singular values 3 (along w=2), then 1 (along w=9)
    assert delta_vs_weight(delta, weight, rank=1).projection_delta == pytest.approx(2.0)
    assert delta_vs_weight(delta, weight, rank=2).projection_delta == pytest.approx(math.hypot(2.0, 9.0))
    with pytest.raises(ValueError, match="rank must be"):
        delta_vs_weight(delta, weight, rank=3)
    with pytest.raises(ValueError, match="ΔW is"):
        delta_vs_weight(delta, weight.T)


def test_projection_norm_is_the_frobenius_norm_of_the_core(planted):
    p, w, q, weight = planted
    # Uᵀ W Vᵀ for U = P[:, [1, 2]], V = Q[:, [2, 1]]ᵀ is [[0, 7], [5, 0]].
    assert projection_norm(weight, p[:, [1, 2]], q[:, [2, 1]].T) == pytest.approx(math.hypot(7.0, 5.0))
    with pytest.raises(ValueError, match="do not fit"):
        projection_norm(weight, p[:, :2].T, q[:, :2].T)


def test_random_directions_are_orthonormal_and_average_to_the_expectation(planted):
    *_, weight = planted
    g = torch.Generator().manual_seed(5)
    u, vh = random_directions((OUT, IN), 3, g)
    torch.testing.assert_close(u.T @ u, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(vh @ vh.T, torch.eye(3, dtype=torch.float64))
    # E‖UᵀWVᵀ‖²_F = (r/out)(r/in)‖W‖²_F for independent uniform frames.
    draws = [projection_norm(weight, *random_directions((OUT, IN), 3, g)) ** 2 for _ in range(4000)]
    expected = 9 / (OUT * IN) * sum(v * v for v in W_SINGULAR)
    assert sum(draws) / len(draws) == pytest.approx(expected, rel=0.05)
