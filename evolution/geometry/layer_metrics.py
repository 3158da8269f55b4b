"""Per-layer geometry of a token cloud: linearity between consecutive layers, anisotropy.

Linearity (Razzhigaev et al. 2024, *Your Transformer is Secretly Linear*, ACL): with X the token
embeddings at layer l and Y those at layer l+1 (rows = the same tokens),

    X̃ = (X − mean X) / ‖X − mean X‖_F,   Ỹ = (Y − mean Y) / ‖Y − mean Y‖_F,
    linearity = 1 − min_A ‖X̃A − Ỹ‖²_F.

Because Ỹ is centred with unit norm this is the R² of the least-squares map from X̃ to Ỹ. It is
invariant to translating X or Y (centring) and to scaling either (normalising).

*Without residual* replaces Y by the block's own contribution D = Y − X, formed from the **raw**
(uncentred, unnormalised) activations, and then treats D exactly as Y above: D̃ = (D − mean D) /
‖D − mean D‖_F, score = 1 − min_A ‖X̃A − D̃‖²_F. So it is invariant to translating X and Y separately
and to scaling X and Y by the *same* factor (not separately: that changes D's direction). The residual
stream carries X straight through, so with-residual scores are near 1 in trained decoders; the score
without it is lower and falls during pre-training (Razzhigaev et al. 2024, Fig. 1, 4).

Per-token nonlinearity: the fitted map's residual per token, e_i = N · ‖(X̃A − Ỹ)_i‖², scaled by the
number of tokens N so that mean_i e_i = 1 − linearity (a token with e_i ≫ 1 is one the linear map fits
badly).

Held-out linearity: the in-sample score is an R² and rises with d/n by overfitting alone (a pure-noise
pair scores ≈ d/n). `linearity_heldout` fits the map on a random half of the tokens (centred with that
half's means) and scores it on the other half: 1 − SSE_test / SST_test, with SST_test about the test
half's own mean, so noise scores ≈ 0 or below and an exact affine map scores 1.

Anisotropy (Razzhigaev et al. 2024, *The Shape of Learning*): σ₁² / Σσᵢ² of the centred embedding
matrix, the share of variance along the top principal direction (1/d for an isotropic cloud, 1 for a
line).

All fits are float64, on the device the activations live on (the model's: a GPU's fp64 least squares on
4096 × 768 takes milliseconds): with d ≈ 500 and scores near 1, float32 least squares loses the digits that
distinguish layers (the error grows with the condition number of X̃, 1e4 and more in trained residual
streams, times fp32's 6e-8). The solver is the SVD (`lstsq`), the same minimum-norm answer as LAPACK's
gelsd on every device: CUDA's `torch.linalg.lstsq` offers only gels, which needs a full-rank X.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def _centre_normalise(X: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    X = X.to(torch.float64)
    X = X - X.mean(0, keepdim=True)
    norm = torch.linalg.matrix_norm(X)
    if norm == 0:
        raise ValueError("cannot normalise a constant embedding matrix (all tokens identical)")
    return X / norm


def lstsq(X: Float[Tensor, "n d"], Y: Float[Tensor, "n k"],
          svd: tuple[Tensor, Tensor, Tensor] | None = None) -> Float[Tensor, "d k"]:
    """Minimum-norm least-squares A of X A ≈ Y through the SVD of X, singular values at or below
    eps · max(n, d) · σ₁ cut (LAPACK gelsd's rule and answer, so a rank-deficient X, with fewer tokens than
    dims or dead directions, is fine), on X's device. `svd`: X's (U, S, Vh) when the caller has it already."""
    U, S, Vh = svd if svd is not None else torch.linalg.svd(X, full_matrices=False)
    cut = S.amax() * torch.finfo(S.dtype).eps * max(X.shape)
    inv = torch.where(S > cut, 1.0 / S, torch.zeros_like(S))
    return Vh.mT @ (inv[:, None] * (U.mT @ Y))


def _lstsq_residual(Xt: Float[Tensor, "n d"], Yt: Float[Tensor, "n k"],
                   svd: tuple[Tensor, Tensor, Tensor] | None = None) -> Float[Tensor, "n k"]:
    return Xt @ lstsq(Xt, Yt, svd) - Yt


def linearity_fit(
    X: Float[Tensor, "n d_x"], Y: Float[Tensor, "n d_y"], residual: bool = True
) -> tuple[float, Float[Tensor, " n"]]:
    """(linearity score, per-token nonlinearity e_i) of the map from layer X to layer Y.

    `residual=False` scores the block's own output Y − X instead of Y (see the module docstring)."""
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same tokens, got {X.shape[0]} and {Y.shape[0]} rows")
    target = Y if residual else Y.to(torch.float64) - X.to(torch.float64)
    R = _lstsq_residual(_centre_normalise(X), _centre_normalise(target))
    per_token = R.pow(2).sum(1)
    return 1.0 - per_token.sum().item(), per_token * X.shape[0]


def linearity_score(X: Float[Tensor, "n d_x"], Y: Float[Tensor, "n d_y"], residual: bool = True) -> float:
    """1 − min_A ‖X̃A − Ỹ‖²_F (Razzhigaev et al. 2024); `residual=False` uses Y − X for Y."""
    return linearity_fit(X, Y, residual)[0]


def linearity_pair(X: Float[Tensor, "n d"], Y: Float[Tensor, "n d"], seed: int = 0) -> dict[str, float]:
    """Both scores (in-sample, and held-out on a `seed`ed half split), the per-token nonlinearity summary and
    X's anisotropy for one layer transition. Two SVDs in all (they are the cost: 0.66 s each at 1024 x 768 in
    float64 on 2 CPU cores): X̃'s serves both in-sample targets and the anisotropy (centring then scaling
    leaves σ₁² / Σσᵢ² unchanged), the fit half's serves both held-out targets."""
    Xt = _centre_normalise(X)
    targets = torch.cat([_centre_normalise(Y), _centre_normalise(Y.to(torch.float64) - X.to(torch.float64))], 1)
    svd = torch.linalg.svd(Xt, full_matrices=False)
    R = _lstsq_residual(Xt, targets, svd)
    d = Y.shape[1]
    per_token = R[:, :d].pow(2).sum(1) * X.shape[0]
    held = _heldout_r2(X, [Y, Y.to(torch.float64) - X.to(torch.float64)], *_split(X.shape[0], seed))
    return {
        "linearity": 1.0 - R[:, :d].pow(2).sum().item(),
        "linearity_no_residual": 1.0 - R[:, d:].pow(2).sum().item(),
        "linearity_heldout": float(held[0]),
        "linearity_no_residual_heldout": float(held[1]),
        "token_nonlinearity_p90": torch.quantile(per_token, 0.9).item(),
        "token_nonlinearity_max": per_token.max().item(),
        "anisotropy": _anisotropy_from(svd[1]),
    }


def linearity_and_anisotropy(X: Float[Tensor, "n d"], Y: Float[Tensor, "n d"], residual: bool = True
                             ) -> tuple[float, float]:
    """(`linearity_score(X, Y, residual)`, `anisotropy(X)`) from one SVD of X̃."""
    Xt = _centre_normalise(X)
    T = _centre_normalise(Y if residual else Y.to(torch.float64) - X.to(torch.float64))
    svd = torch.linalg.svd(Xt, full_matrices=False)
    return 1.0 - _lstsq_residual(Xt, T, svd).pow(2).sum().item(), _anisotropy_from(svd[1])


def _split(n: int, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # the same split on every device
    return perm[: n // 2], perm[n // 2 :]


def _heldout_r2(X: Float[Tensor, "n d"], targets: list[Float[Tensor, "n k"]], fit: Tensor, test: Tensor
                ) -> list[float]:
    """Per target, 1 − SSE/SST on `test` of the least-squares affine map fitted on `fit` (float64); the targets
    share one factorisation of X's fit half."""
    X = X.to(torch.float64)
    fit, test = fit.to(X.device), test.to(X.device)
    T = torch.cat([t.to(torch.float64) for t in targets], 1)
    mx, mt = X[fit].mean(0), T[fit].mean(0)
    err = ((X[test] - mx) @ lstsq(X[fit] - mx, T[fit] - mt) + mt - T[test]).pow(2)
    out, lo = [], 0
    for t in targets:
        hi = lo + t.shape[1]
        sst = (T[test, lo:hi] - T[test, lo:hi].mean(0)).pow(2).sum()
        if sst == 0:
            raise ValueError("constant target on the held-out half: linearity is undefined")
        out.append(float(1.0 - err[:, lo:hi].sum() / sst))
        lo = hi
    return out


def linearity_heldout(X: Float[Tensor, "n d_x"], Y: Float[Tensor, "n d_y"], residual: bool = True, seed: int = 0) -> float:
    """Out-of-sample linearity: map fitted on a random half of the tokens, R² on the other half (module
    docstring); `residual=False` scores Y − X."""
    if X.shape[0] != Y.shape[0] or X.shape[0] < 4:
        raise ValueError(f"need the same >= 4 tokens in X and Y, got {X.shape[0]} and {Y.shape[0]} rows")
    target = Y if residual else Y.to(torch.float64) - X.to(torch.float64)
    return _heldout_r2(X, [target], *_split(X.shape[0], seed))[0]


def anisotropy(X: Float[Tensor, "n d"]) -> float:
    """σ₁² / Σσᵢ² of the centred embedding matrix (The Shape of Learning, Razzhigaev et al. 2024)."""
    Xc = X.to(torch.float64) - X.to(torch.float64).mean(0, keepdim=True)
    return _anisotropy_from(torch.linalg.svdvals(Xc))


def _anisotropy_from(S: Float[Tensor, " k"]) -> float:
    s2 = S.pow(2)
    total = s2.sum()
    if total == 0:
        raise ValueError("anisotropy of a constant embedding matrix is undefined")
    return (s2.amax() / total).item()
