"""Intrinsic-dimension estimators against clouds of known dimension and against scikit-dimension."""

import numpy as np
import pytest
import torch

from evolution.geometry.intrinsic_dim import dedupe, intrinsic_dims, knn_distances, mle_id, twonn

AMBIENT = 256


def _embed(Z: torch.Tensor, seed: int) -> torch.Tensor:
    """Isometric embedding of Z [n, k] into AMBIENT dims by a random orthonormal frame."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(AMBIENT, Z.shape[1], generator=g, dtype=torch.float64))[0]
    return Z @ Q.T


def _gaussian_subspace(d: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return _embed(torch.randn(n, d, generator=g, dtype=torch.float64), seed)


# TwoNN's finite-sample bias grows with d (the density is not constant over the two-neighbour scale),
# so d = 20 needs more points to come within 10%: 4000 points give 17.1, 10000 give 18.0.
@pytest.mark.parametrize("d,n", [(2, 3000), (5, 3000), (10, 4000), (15, 6000), (20, 10000)])
def test_twonn_linear_subspace_within_10pct(d, n):
    est = twonn(_gaussian_subspace(d, n, seed=d))
    assert abs(est - d) / d < 0.10, (d, est)


@pytest.mark.parametrize("d", [2, 5, 10])
def test_mle_linear_subspace_within_10pct(d):
    est = mle_id(_gaussian_subspace(d, 3000, seed=d))
    assert abs(est - d) / d < 0.10, (d, est)


@pytest.mark.parametrize("d", [2, 5, 8])
def test_sphere_embedded_with_rotation(d):
    """Uniform points on the d-sphere S^d ⊂ R^{d+1}, rotated into 256 dims: curved, no boundary."""
    g = torch.Generator().manual_seed(d)
    Z = torch.randn(3000, d + 1, generator=g, dtype=torch.float64)
    X = _embed(Z / Z.norm(dim=1, keepdim=True), seed=d + 7)
    r = intrinsic_dims(X)
    assert abs(r["id_twonn"] - d) / d < 0.10, r
    assert abs(r["id_mle"] - d) / d < 0.15, r


def test_swiss_roll_is_two_dimensional():
    g = np.random.default_rng(0)
    t = 1.5 * np.pi * (1 + 2 * g.random(3000))
    h = 21 * g.random(3000)
    Z = torch.tensor(np.stack([t * np.cos(t), h, t * np.sin(t)], 1))
    r = intrinsic_dims(_embed(Z, seed=3))
    assert abs(r["id_twonn"] - 2) < 0.2, r
    assert abs(r["id_mle"] - 2) < 0.3, r


def test_duplicates_are_removed_not_counted():
    X = _gaussian_subspace(5, 1500, seed=1)
    Xdup = torch.cat([X, X[:500], X[:100]])  # 600 duplicate rows
    U, n_dup = dedupe(Xdup)
    assert n_dup == 600 and U.shape[0] == 1500
    assert twonn(Xdup) == pytest.approx(twonn(X), rel=1e-12)
    assert intrinsic_dims(Xdup)["duplicate_frac"] == pytest.approx(600 / 2100)


def test_knn_distances_match_brute_force():
    X = torch.randn(300, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    D = torch.cdist(X, X)
    D.fill_diagonal_(float("inf"))
    ref = D.sort(1).values[:, :5]
    assert torch.allclose(knn_distances(X, 5, chunk=64), ref, atol=1e-9)


@pytest.mark.parametrize("cloud", ["subspace", "sphere"])
def test_twonn_agrees_with_scikit_dimension(cloud):
    """Same fit as skdim.id.TwoNN(discard_fraction=0.1, method='linear'); on duplicate-free clouds the
    two must agree to numerical precision."""
    skdim = pytest.importorskip("skdim")
    if cloud == "subspace":
        X = _gaussian_subspace(7, 1500, seed=11)
    else:
        Z = torch.randn(1500, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        X = _embed(Z / Z.norm(dim=1, keepdim=True), seed=12)
    ours = twonn(X)
    ref = skdim.id.TwoNN(discard_fraction=0.1).fit(X.numpy()).dimension_
    assert ours == pytest.approx(ref, rel=1e-6), (ours, ref)
