"""The SVD of ΔW = s·B·A from its factors against planted spectra and a dense float64 SVD, and the two
effective ranks on spectra whose values are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.analysis import delta_svd, effective_rank, energy_rank


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_planted_low_rank_update_gives_its_singular_values_and_directions():
    out_dim, in_dim, r = 20, 14, 4
    u, v = _orthonormal(out_dim, r, 0), _orthonormal(in_dim, r, 1)
    sigma = torch.tensor([5.0, 2.0, 1.0, 0.25], dtype=torch.float64)
    # ΔW = U Σ Vᵀ split into non-orthogonal factors B = U Σ M, A = M⁻¹ Vᵀ, then scaled by s = 2.
    mix = torch.randn(r, r, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 3 * torch.eye(
        r, dtype=torch.float64
    )
    b, a = (u @ torch.diag(sigma) @ mix).float(), (torch.linalg.inv(mix) @ v.T).float()
    svd = delta_svd(b, a, scaling=2.0)
    torch.testing.assert_close(svd.s, 2 * sigma, rtol=1e-5, atol=1e-6)
    # Directions up to sign: |⟨uᵢ, ûᵢ⟩| = 1.
    torch.testing.assert_close((u.T @ svd.u).diagonal().abs(), torch.ones(r, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close((svd.vh @ v).diagonal().abs(), torch.ones(r, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(svd.u @ torch.diag(svd.s) @ svd.vh, 2 * u @ torch.diag(sigma) @ v.T, rtol=0, atol=1e-5)


def test_matches_a_dense_svd_and_finds_a_lower_true_rank():
    g = torch.Generator().manual_seed(4)
    # r = 6 factors whose product has rank 3: B's last three columns repeat its first three.
    half = torch.randn(30, 3, generator=g, dtype=torch.float64)
    b, a = torch.cat([half, half], dim=1), torch.randn(6, 25, generator=g, dtype=torch.float64)
    svd = delta_svd(b, a, scaling=0.5)
    dense = torch.linalg.svdvals(0.5 * b @ a)
    torch.testing.assert_close(svd.s, dense[:6], rtol=1e-10, atol=1e-10)
    assert (svd.s > 1e-10 * svd.s[0]).sum() == 3


def test_entropy_rank_by_hand():
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0])) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([7.0])) == pytest.approx(1.0)
    # p = (3/4, 1/4): exp(−(¾ ln ¾ + ¼ ln ¼))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(expected)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_energy_rank_by_hand():
    # energies 9, 1: the first holds exactly 90 %.
    assert energy_rank(torch.tensor([3.0, 1.0])) == 1
    # energies 4, 4, 1, 1 (total 10): 40 %, 80 %, 90 % → 3 at 90 %, 2 at 80 %, 4 at 95 %.
    s = torch.tensor([2.0, 2.0, 1.0, 1.0])
    assert (energy_rank(s), energy_rank(s, 0.8), energy_rank(s, 0.95)) == (3, 2, 4)
    assert energy_rank(torch.ones(10)) == 9  # ten equal values: nine hold 90 %
    assert energy_rank(torch.tensor([1.0, 3.0])) == 1  # order of the input does not matter
    assert energy_rank(torch.zeros(4)) == 0
    with pytest.raises(ValueError, match="fraction"):
        energy_rank(s, 0.0)


def test_factor_shapes_are_checked():
    with pytest.raises(ValueError, match="not the factors"):
        delta_svd(torch.randn(5, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="exceeds"):
        delta_svd(torch.randn(5, 4), torch.randn(4, 3))
