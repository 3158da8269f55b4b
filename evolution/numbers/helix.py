"""The generalized helix of Kantamneni & Tegmark 2025 (*Language Models Use Trigonometry to Do Addition*,
arXiv 2502.00873): a fit of number representations, its baselines and nulls, and a Fourier spectrum.

The paper (§4.2) models the residual stream h_a of the number a as `h_a = C · B(a)` with the basis

    B(a) = [a, cos(2πa/T_1), sin(2πa/T_1), ..., cos(2πa/T_k), sin(2πa/T_k)],   T = (2, 5, 10, 100),

and fits it (§4.3) by "first us[ing] PCA to project the residual stream ... to 100 dimensions", then
linear regression for C_PCA (100 × (2k+1)), then the inverse PCA to get C in the full residual space.
We do the same, with an intercept (the PCA centres the activations), and score the fit by **R² on
held-out numbers** (k-fold over a; the PCA and C are fitted on the training numbers only):

    R² = 1 − Σ_{a held out} ‖h_a − ĥ_a‖² / Σ_{a held out} ‖h_a − mean_train(h)‖²,

pooled over the folds. Baselines, each scored the same way:

- `pca`: the held-out h_a projected on the top 2k+1 principal components of the training numbers (the
  paper's "PCA" baseline, §4.4). It sees h_a itself, so it is an upper reference for any
  (2k+1)-dimensional description; the helix only sees a.
- `linear`: the basis [a] alone (no Fourier features).
- `random_periods`: the same basis with k periods drawn uniformly from [2, n_numbers] (mean and q95).
- `shuffled` (the null): the helix fitted after permuting which number each activation belongs to (the
  paper's "helix trained on a randomized order of a", §4.4); its `null_quantile` is the bar a helix
  must clear to count as present.

**Period strength** of T: the share of the activations' variance over a (centred, summed over d_model)
that cos/sin(2πa/T) explain once the linear fit in [1, a] is removed (in-sample). The linear
term is removed first because a ramp over 0..N−1 is a sawtooth whose spectrum leaks into every low
frequency (T = N, N/2, ...). Its null: the same statistic after permuting a (`null_quantile`).
**Spectrum**: the same, for every frequency k = 1..N/2 of a contiguous range 0..N−1 (period N/k), from
the DFT over a of the linearly-detrended activations (§4.1 of the paper centres and Fourier-transforms
the residual stream over a and averages the spectra over model_dim; ours is that power as a fraction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

DEFAULT_PERIODS = (2.0, 5.0, 10.0, 100.0)
"""Kantamneni & Tegmark 2025, §4.2: the four Fourier features of GPT-J's number helix."""


@dataclass
class HelixConfig:
    periods: list[float] = field(default_factory=lambda: list(DEFAULT_PERIODS))
    """Periods T of the Fourier features cos/sin(2πa/T)."""
    n_pca: int = 100
    """PCA dimensions the activations are projected to before the regression (the paper's 100)."""
    n_folds: int = 5
    """Folds over the numbers for the held-out R²."""
    n_null: int = 100
    """Permutations of the numbers for the shuffled null (helix R² and period strengths)."""
    n_random_periods: int = 20
    """Draws of random periods for the random-periods baseline."""
    null_quantile: float = 0.99
    """Quantile of the null distribution a value must exceed to count as present."""
    seed: int = 0
    """Seed of the folds, the permutations and the random periods."""


def helix_basis(a: Float[Tensor, " n"], periods: Sequence[float]) -> Float[Tensor, "n basis"]:
    """B(a) = [a, cos(2πa/T), sin(2πa/T) for T in periods], float64; basis = 1 + 2·len(periods)."""
    a = a.double()
    cols = [a]
    for T in periods:
        cols += [torch.cos(2 * math.pi * a / T), torch.sin(2 * math.pi * a / T)]
    return torch.stack(cols, 1)


def _with_intercept(B: Tensor) -> Tensor:
    return torch.cat([torch.ones(B.shape[0], 1, dtype=B.dtype), B], 1)


def _lstsq(B: Tensor, Y: Tensor) -> Tensor:
    """Minimum-norm least squares (SVD based, so a rank-deficient basis such as sin(πa) ≡ 0 is fine)."""
    return torch.linalg.pinv(B) @ Y


def _folds(n: int, n_folds: int, g: torch.Generator) -> list[Tensor]:
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be in [2, n_numbers={n}], got {n_folds}")
    return list(torch.randperm(n, generator=g).chunk(n_folds))


def _cv_sse(X: Tensor, a: Tensor, folds: list[Tensor], predict) -> tuple[float, float]:
    """Pooled (SSE, SST) over folds; `predict(X_tr, a_tr, X_te, a_te, mu)` returns X̂_te (mean added back)."""
    sse = sst = 0.0
    n = X.shape[0]
    for te in folds:
        tr = torch.ones(n, dtype=torch.bool)
        tr[te] = False
        mu = X[tr].mean(0)
        X_hat = predict(X[tr], a[tr], X[te], a[te], mu)
        sse += float(((X[te] - X_hat) ** 2).sum())
        sst += float(((X[te] - mu) ** 2).sum())
    return sse, sst


def _pca(Xc: Tensor, n: int) -> Tensor:
    """[d, n] top right-singular vectors of centred Xc."""
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    return Vh[:n].T


def _helix_predictor(periods: Sequence[float], n_pca: int):
    def predict(X_tr, a_tr, X_te, a_te, mu):
        V = _pca(X_tr - mu, n_pca)  # the paper's PCA to 100 dims (lossless when n_train <= 100)
        C = _lstsq(_with_intercept(helix_basis(a_tr, periods)), (X_tr - mu) @ V)  # C_PCA
        return mu + _with_intercept(helix_basis(a_te, periods)) @ C @ V.T  # inverse PCA back to d_model
    return predict


def _pca_predictor(n_dims: int):
    def predict(X_tr, a_tr, X_te, a_te, mu):
        V = _pca(X_tr - mu, n_dims)
        return mu + (X_te - mu) @ V @ V.T
    return predict


def cv_r2(X: Float[Tensor, "n d"], a: Float[Tensor, " n"], periods: Sequence[float], n_pca: int = 100,
          n_folds: int = 5, seed: int = 0) -> float:
    """Held-out R² of the helix with `periods` (empty: the linear-only fit) on activations X of numbers a."""
    X, a = X.double(), a.double()
    sse, sst = _cv_sse(X, a, _folds(len(a), n_folds, torch.Generator().manual_seed(seed)),
                       _helix_predictor(periods, n_pca))
    return 1.0 - sse / sst if sst > 0 else float("nan")


def pca_r2(X: Float[Tensor, "n d"], n_dims: int, n_folds: int = 5, seed: int = 0) -> float:
    """Held-out R² of the top-`n_dims` PCA reconstruction (same folds as `cv_r2` for the same seed)."""
    X = X.double()
    a = torch.zeros(X.shape[0], dtype=torch.float64)
    sse, sst = _cv_sse(X, a, _folds(len(a), n_folds, torch.Generator().manual_seed(seed)), _pca_predictor(n_dims))
    return 1.0 - sse / sst if sst > 0 else float("nan")


def units_digit_r2(X: Float[Tensor, "n d"], a: Float[Tensor, " n"], base: int = 10, n_folds: int = 5,
                   seed: int = 0) -> float:
    """Held-out R² of a lookup table on the last digit (one-hot of a mod base): what a model whose tokenizer
    splits digits carries for free at the last digit's position (same folds as `cv_r2`)."""
    X, a = X.double(), a.double()

    def predict(X_tr, a_tr, X_te, a_te, mu):
        onehot = lambda v: torch.nn.functional.one_hot(v.long() % base, base).double()  # noqa: E731
        return mu + onehot(a_te) @ _lstsq(onehot(a_tr), X_tr - mu)

    sse, sst = _cv_sse(X, a, _folds(len(a), n_folds, torch.Generator().manual_seed(seed)), predict)
    return 1.0 - sse / sst if sst > 0 else float("nan")


def period_strength(X: Float[Tensor, "n d"], a: Float[Tensor, " n"], period: float) -> float:
    """Share of X's variance over a that cos/sin(2πa/T) explain in X detrended by [1, a] (in-sample); for
    a = 0..N−1 and T dividing N it equals `fourier_spectrum`'s share at T (cos/sin are then orthogonal)."""
    X, a = X.double(), a.double()
    Xc = X - X.mean(0)
    sst = float((Xc**2).sum())
    if sst <= 0:
        return float("nan")
    B0 = _with_intercept(a[:, None])
    R = Xc - B0 @ _lstsq(B0, Xc)  # linearly detrended, as for the spectrum
    B1 = _with_intercept(helix_basis(a, [period])[:, 1:])
    return float(((R - R.mean(0)) ** 2).sum() - ((R - B1 @ _lstsq(B1, R)) ** 2).sum()) / sst


def fourier_spectrum(X: Float[Tensor, "n d"], a: Float[Tensor, " n"]) -> tuple[list[float], list[float]]:
    """(periods N/k, variance share) for k = 1..N//2, over a contiguous range a = a0..a0+N−1, after removing
    the linear fit in a (see the module docstring). Shares are fractions of the total centred variance."""
    a = a.double()
    order = a.argsort()
    a, X = a[order], X.double()[order]
    N = len(a)
    if not torch.equal(a - a[0], torch.arange(N, dtype=torch.float64)):
        raise ValueError("fourier_spectrum needs the numbers to be a contiguous range (e.g. 0..99)")
    Xc = X - X.mean(0)
    sst = float((Xc**2).sum())
    B0 = _with_intercept(a[:, None])
    R = Xc - B0 @ _lstsq(B0, Xc)
    F = torch.fft.rfft(R, dim=0)  # [N//2+1, d]
    power = (F.abs() ** 2).sum(1)
    ks = torch.arange(1, N // 2 + 1)
    w = torch.where(ks * 2 == N, 1.0, 2.0).double()  # Parseval: conjugate pairs count twice, Nyquist once
    share = (w * power[ks] / N) / sst if sst > 0 else torch.full((len(ks),), float("nan"))
    return [N / int(k) for k in ks], share.tolist()


@dataclass
class HelixFit:
    """What `fit_helix` measured on one activation set (all R² held out; strengths in-sample)."""

    periods: list[float]
    n_numbers: int
    helix_r2: float
    pca_r2: float
    """Top-(2k+1) PCA reconstruction of h itself (the paper's PCA baseline)."""
    linear_r2: float
    random_periods_r2: float
    """Mean over `n_random_periods` draws of k random periods."""
    random_periods_r2_q95: float
    shuffled_r2_null: float
    """`null_quantile` of the helix R² with the numbers permuted."""
    helix_above_null: bool
    strength: dict[str, float]
    """Period (as str) -> strength (partial R² on top of the linear term)."""
    strength_null: dict[str, float]
    """Period -> `null_quantile` of its strength with the numbers permuted."""
    spectrum_periods: list[float] | None = None
    spectrum: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def fit_helix(X: Float[Tensor, "n d"], a: Float[Tensor, " n"], cfg: HelixConfig | None = None) -> HelixFit:
    """Fit the helix to activations X of the numbers a, with its baselines, nulls and spectrum."""
    cfg = cfg or HelixConfig()
    X, a = torch.as_tensor(X).double(), torch.as_tensor(a).double()
    if X.ndim != 2 or a.ndim != 1 or X.shape[0] != a.shape[0]:
        raise ValueError(f"need X [n, d] and a [n], got {tuple(X.shape)} and {tuple(a.shape)}")
    if not torch.isfinite(X).all():
        raise ValueError("activations contain NaN or inf")
    n, k = len(a), len(cfg.periods)
    if n < 2 * k + 4:
        raise ValueError(f"{n} numbers are too few for a helix with {k} periods (need >= {2 * k + 4})")
    g = torch.Generator().manual_seed(cfg.seed)
    q = cfg.null_quantile

    def cv(periods, a_):
        return cv_r2(X, a_, periods, cfg.n_pca, cfg.n_folds, cfg.seed)

    helix = cv(cfg.periods, a)
    lo, hi = 2.0, max(float(a.max() - a.min()) + 1, 3.0)
    rand = [cv((lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64)).tolist(), a)
            for _ in range(cfg.n_random_periods)]
    perms = [a[torch.randperm(n, generator=g)] for _ in range(cfg.n_null)]
    null = torch.tensor([cv(cfg.periods, p) for p in perms]) if perms else torch.tensor([float("nan")])
    strength, strength_null = {}, {}
    for T in cfg.periods:
        strength[_key(T)] = period_strength(X, a, T)
        s_null = torch.tensor([period_strength(X, p, T) for p in perms]) if perms else torch.tensor([float("nan")])
        strength_null[_key(T)] = float(s_null.quantile(q))
    contiguous = torch.equal(a.sort().values - a.min(), torch.arange(n, dtype=torch.float64))
    sp = fourier_spectrum(X, a) if contiguous else (None, None)
    rand_t = torch.tensor(rand) if rand else torch.tensor([float("nan")])
    null_q = float(null.quantile(q))
    return HelixFit(
        periods=list(map(float, cfg.periods)), n_numbers=n, helix_r2=helix,
        pca_r2=pca_r2(X, 2 * k + 1, cfg.n_folds, cfg.seed), linear_r2=cv([], a),
        random_periods_r2=float(rand_t.mean()), random_periods_r2_q95=float(rand_t.quantile(0.95)),
        shuffled_r2_null=null_q, helix_above_null=bool(helix > null_q),
        strength=strength, strength_null=strength_null, spectrum_periods=sp[0], spectrum=sp[1],
    )  # fmt: skip


def _key(T: float) -> str:
    """A period as a JSON key: "10" for 10.0, "2.5" for 2.5."""
    return f"{T:g}"


def emergence_step(steps: Sequence[int], values: Sequence[float], nulls: Sequence[float]) -> int | None:
    """First step from which the value stays above its null at every later snapshot (None: not at the last).

    "Stays" makes a one-snapshot blip early in training not count as the structure's emergence."""
    above = [v is not None and nl is not None and v > nl for v, nl in zip(values, nulls, strict=True)]
    if not above or not above[-1]:
        return None
    i = len(above) - 1
    while i > 0 and above[i - 1]:
        i -= 1
    return int(steps[i])
