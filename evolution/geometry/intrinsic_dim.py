"""Intrinsic dimension of a point cloud: TwoNN (Facco et al. 2017) and the Levina–Bickel MLE.

Both estimators read only nearest-neighbour distances, so a layer's token cloud needs no more than a
few thousand points. Two estimators are kept so each checks the other (The Shape of Learning,
Razzhigaev et al. 2024, reports TwoNN-family IDs; ours are validated against scikit-dimension and
against clouds of known dimension in tests/evolution/geometry/test_intrinsic_dim.py).

Choices, each documented because the numbers depend on them:
- **Duplicates.** Identical points (the same token id at the embedding layer, repeated contexts) give
  r1 = 0 and an infinite ratio. We keep one copy of each distinct row *before* the neighbour search
  (Facco et al. 2017, §Methods: the estimator assumes distinct points); `dedupe` reports how many went.
  scikit-dimension instead drops every point whose r1 is 0 after the search; on clouds without
  duplicates both are the same.
- **TwoNN fit.** mu = r2/r1, sorted; F_emp(mu_(i)) = i/N; the largest `discard_fraction` (default 10%,
  as Facco et al.) of the ratios are dropped because the tail is noise-dominated; then a line through
  the origin is fitted to (log mu, −log(1 − F_emp)), since for a Pareto(1, d) law −log(1 − F) = d log mu
  exactly. This is scikit-dimension's `TwoNN(discard_fraction=0.1, method="linear")`.
- **MLE.** Levina & Bickel 2004 with the MacKay & Ghahramani 2005 correction: average the *inverse*
  per-point estimates (1/m_k = mean over points of (1/(k−1)) Σ_{j<k} log(T_k/T_j)), then average the
  resulting m_k over k in [k1, k2].
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor


def dedupe(X: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "m d"], int]:
    """Distinct rows of X (exact duplicates removed) and how many rows were removed."""
    uniq = torch.unique(X, dim=0)
    return uniq, X.shape[0] - uniq.shape[0]


def knn_distances(X: Float[Tensor, "n d"], k: int, chunk: int = 1024) -> Float[Tensor, "n k"]:
    """Euclidean distances from each point to its k nearest *other* points, ascending; float64.

    Distances come from ‖x‖² + ‖y‖² − 2x·y in float64 (exact enough for ratios of distances near 1e-6
    of the cloud's scale; in fp32 the expansion cancels to noise there), on X's device; the n × n matrix
    is formed `chunk` rows at a time to bound memory."""
    X = X.to(torch.float64)
    n = X.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points for a {k}-NN search, got {n}")
    sq = (X * X).sum(1)
    out = torch.empty(n, k, dtype=torch.float64, device=X.device)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        d2 = sq[rows, None] + sq[None, :] - 2.0 * X[rows] @ X.T
        idx = torch.arange(rows.start, rows.stop, device=X.device)
        d2[idx - start, idx] = float("inf")  # a point is not its own neighbour
        out[rows] = d2.clamp_min(0).topk(k, dim=1, largest=False).values.sqrt()
    return out


def twonn_from_knn(r: Float[Tensor, "n k"], discard_fraction: float = 0.1) -> float:
    """TwoNN from the first two neighbour distances (columns 0, 1 of `knn_distances`)."""
    r1, r2 = r[:, 0], r[:, 1]
    ok = r1 > 0  # only reachable with duplicates left in (or float ties)
    mu = torch.sort(r2[ok] / r1[ok]).values.cpu().numpy()  # n ratios: the fit is a few numpy lines
    n = len(mu)
    n_keep = int(n * (1 - discard_fraction))
    if n_keep < 2:
        raise ValueError(f"TwoNN needs at least 2 ratios after discarding, got {n_keep} of {n}")
    x = np.log(mu[:n_keep])
    y = -np.log(1.0 - np.arange(1, n_keep + 1) / n)
    return float((x @ y) / (x @ x))


def mle_from_knn(T: Float[Tensor, "n k"], k1: int = 10, k2: int = 20) -> float:
    """Levina–Bickel MLE with MacKay–Ghahramani averaging, from distances to the k2 nearest neighbours."""
    if not 2 <= k1 <= k2 <= T.shape[1]:
        raise ValueError(f"need 2 <= k1 <= k2 <= {T.shape[1]}, got k1={k1}, k2={k2}")
    logT = T.clamp_min(torch.finfo(torch.float64).tiny).log()
    estimates = []
    for k in range(k1, k2 + 1):
        # 1/m_k(x) = (1/(k-1)) Σ_{j=1}^{k-1} log(T_k / T_j); average the inverses over x (MacKay–Ghahramani)
        inv = (logT[:, k - 1 : k] - logT[:, : k - 1]).sum(1) / (k - 1)
        estimates.append(1.0 / inv.mean().item())
    return float(np.mean(estimates))


def twonn(X: Float[Tensor, "n d"], discard_fraction: float = 0.1, remove_duplicates: bool = True) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017): slope through the origin of −log(1 − F_emp) on
    log(r2/r1), after dropping duplicates and the largest `discard_fraction` of the ratios."""
    if remove_duplicates:
        X, _ = dedupe(X)
    return twonn_from_knn(knn_distances(X, 2), discard_fraction)


def mle_id(X: Float[Tensor, "n d"], k1: int = 10, k2: int = 20, remove_duplicates: bool = True) -> float:
    """Levina–Bickel MLE of intrinsic dimension, MacKay–Ghahramani averaging, averaged over k1..k2."""
    if remove_duplicates:
        X, _ = dedupe(X)
    return mle_from_knn(knn_distances(X, k2), k1, k2)


def intrinsic_dims(
    X: Float[Tensor, "n d"], discard_fraction: float = 0.1, k1: int = 10, k2: int = 20
) -> dict[str, float]:
    """Both estimators from one neighbour search on the de-duplicated cloud, plus the duplicate share."""
    U, n_dup = dedupe(X)
    T = knn_distances(U, max(k2, 2))
    return {
        "id_twonn": twonn_from_knn(T, discard_fraction),
        "id_mle": mle_from_knn(T, k1, k2),
        "duplicate_frac": n_dup / X.shape[0],
    }
