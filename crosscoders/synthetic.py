"""Synthetic activations from known sparse features: the ground truth for crosscoder recovery tests.

Each planted feature i has, per source s, a unit direction `directions[s, i]` and a norm `profiles[i, s]`;
a token activates a random sparse set of features with magnitudes a_i >= 0 shared by all sources
(the same token seen by every snapshot), so

    x_s = sum_i a_i profiles[i, s] directions[s, i] + noise.

Directions turn smoothly over sources (a per-feature rotation in a random plane, angle growing with s),
and profiles rise, peak at a planted source and fade, like features forming and fading in training
(Ge et al. 2025). `turn_at` plants a sharp turn: at that source most features' directions jump by
`turn_angle` (Ge et al. see most directions turn around step ~1000).

Harder data (`hard_config`): `profile="rise_fade"` gives each feature a birth, peak and death snapshot
(zero outside [birth, death], 1 at the peak, every other snapshot at most 1 - peak_margin on a linear rise
from alive_floor and a linear fade), `mag_noise` gives
each token its own per-snapshot magnitudes (a lognormal factor per token, feature and snapshot),
`noise_decay` makes the noise anisotropic (power-law spectrum in a random basis, like the few large
directions of a residual stream) and `offset` adds a per-source mean vector. With more features than
n_sources * d_in / 4 the joint space is in superposition.

A family of generators (`family_config(seed)`, issue 23) draws every knob by seed; for it, `profile="rise"`
(a birth that persists: zero before it, a monotone rise to 1 at the last snapshot) and `"mixed"` (each feature
draws bump, rise_fade or rise), `magnitude` (the distribution of a_i, mean 1.5 for every choice) and
`co_active` (features fire in pairs: a feature's partner fires with it with this probability).

Batches are a deterministic function of (seed, step), so `planted.batches(start_step)` is the resumable
batch source that `crosscoders.train.train` accepts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from torch.nn.functional import normalize


@dataclass
class SyntheticConfig:
    """Planted sparse features over several sources."""

    n_sources: int = 8
    """Number of sources (snapshots)."""
    d_in: int = 32
    """Width of each source's activation."""
    n_features: int = 64
    """Number of planted features (may exceed d_in: superposition)."""
    p_active: float = 0.05
    """Probability that a feature is active on a token."""
    max_rotation: float = 0.6
    """Largest total angle (radians) a feature's direction turns from the first to the last source."""
    peak_width: float = 1.5
    """Width (in sources) of the Gaussian bump of each norm profile around its peak."""
    profile_floor: float = 0.0
    """Norm a feature keeps far from its peak (0 = fades out entirely)."""
    noise: float = 0.01
    """Std of isotropic Gaussian noise per coordinate."""
    turn_at: int | None = None
    """Source index where `turn_frac` of features turn sharply (None = smooth turning only)."""
    turn_frac: float = 0.8
    """Fraction of features that turn at `turn_at`."""
    turn_angle: float = 1.2
    """Angle (radians) of the sharp turn."""
    profile: Literal["bump", "rise_fade", "rise", "mixed"] = "bump"
    """Norm profile over sources: a Gaussian bump around the peak; rise_fade: zero before a birth and after a
    death snapshot with a linear rise to the peak and a linear fade (the peak leads by `peak_margin`); rise: zero
    before a birth, then a linear rise to 1 - peak_margin at the second-last snapshot and 1 at the last (a
    feature born that persists and grows; its peak is the last snapshot); mixed: each feature draws one of the
    three with equal probability."""
    alive_floor: float = 0.3
    """rise_fade, rise: norm at the birth (and death) snapshots (the profile is 1 at the peak)."""
    peak_margin: float = 0.2
    """rise_fade, rise: every snapshot other than the peak has norm at most 1 - peak_margin (the peak is 1), so
    the exact peak index is well-defined for an instrument that reads norms to within this fraction."""
    max_life: int = 0
    """rise_fade, rise: most snapshots from birth to death (rise: to the last snapshot; 0 = n_sources)."""
    alive_frac: float = 0.25
    """A feature is alive in a source where its profile is at least this (recovery is judged there)."""
    mag_noise: float = 0.0
    """Std of a per-token, per-feature, per-source lognormal factor on the magnitude (0 = one magnitude
    per token shared by all sources)."""
    mag_corr: float = 0.0
    """Correlation of that log-factor between adjacent sources (an AR(1) over sources; 0 = independent per
    source). A token's activation in consecutive checkpoints moves together, and far-apart ones less."""
    noise_decay: float = 0.0
    """Noise spectrum: variance of the k-th direction of a random basis ~ k^-noise_decay (0 = isotropic);
    the mean variance per coordinate stays noise^2."""
    offset: float = 0.0
    """Norm of a constant per-source mean vector added to every activation."""
    magnitude: Literal["exponential", "uniform", "lognormal", "constant"] = "exponential"
    """Distribution of a token's magnitude a_i of an active feature, mean 1.5 for each: Exp(1) + 0.5 (bounded
    away from 0), U(0.5, 2.5), a lognormal with log-sd 0.5, or 1.5 always."""
    co_active: float = 0.0
    """Features come in random pairs; when a feature fires, its partner also fires with this probability (with
    its own magnitude). 0 = independent features; the planted L0 is `PlantedFeatures.planted_l0`."""
    seed: int = 0
    """Seed of the ground truth; batches use (seed, step)."""


def hard_config(n_sources: int = 8, d_in: int = 32, seed: int = 0, **overrides) -> SyntheticConfig:
    """Drifting directions, a sharp turn, rise/peak/fade profiles, per-snapshot magnitudes (lognormal, sd 0.3,
    correlation 0.9 between adjacent snapshots), anisotropic noise and an offset, with 1.5 x n_sources * d_in / 4
    features (superposition in the joint space)."""
    cfg = SyntheticConfig(n_sources=n_sources, d_in=d_in, n_features=int(1.5 * n_sources * d_in / 4),
                          p_active=0.03, max_rotation=0.8, profile="rise_fade", max_life=max(3, n_sources * 3 // 4),
                          mag_noise=0.3, mag_corr=0.9, noise=0.05, noise_decay=1.0, offset=1.0, turn_at=n_sources // 2,
                          turn_frac=0.5, turn_angle=0.8, seed=seed)
    return replace(cfg, **overrides)


FAMILY_COST = 24_000
"""family_config keeps n_sources x d_in x n_features at most this, so that one draw trains in about a
minute of one CPU core for every scheme (the per-source gate's step grows with n_sources x d_sae)."""


def family_config(seed: int) -> SyntheticConfig:
    """One generator of the family (issue 23), every knob drawn by `seed` from these ranges:

    - n_sources 2-32 and d_in 16-256 (log-uniform); n_features 0.5-3 x d_in (uniform ratio);
    - planted L0 (mean features active per token) 1-10, at most d_in / 4 (beyond it even a perfect
      dictionary is at the edge of compressed sensing) and n_features / 8 (log-uniform), p_active set from it;
    - magnitude exponential / uniform / lognormal / constant; mag_noise 0-0.3 (half the draws 0),
      mag_corr 0.5-0.95;
    - profile bump / rise_fade / rise / mixed, peak_margin 0.15-0.3, max_life 1-n_sources (rise_fade, rise),
      peak_width 1-2 (bump);
    - max_rotation 0-1 rad (drift); a sharp turn in half the draws (turn_frac 0.3-0.8, turn_angle 0.5-1.5 rad
      at a random snapshot);
    - noise 0.01-0.1, noise_decay 0-1.5 (anisotropy), offset 0-2;
    - co_active 0-0.5 in half the draws (0 otherwise).

    Draws are stratified by `seed % 4` so that any 4 consecutive seeds reach the corners: 0 many sources
    (24-32, d_in 16-20), 1 wide (d_in 200-256, 2-4 sources), 2 dense (L0 at its cap, 2-3 x d_in features),
    3 unconstrained. n_sources x d_in x n_features is then capped at `FAMILY_COST` (n_sources shrink first,
    but n_features first in corner 0) to keep a draw cheap to train."""
    g = torch.Generator().manual_seed(7919 * seed + 1)

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    def logu(lo: float, hi: float) -> float:
        return math.exp(u(math.log(lo), math.log(hi)))

    def pick(options: list):
        return options[int(torch.randint(len(options), (), generator=g))]

    corner = seed % 4
    S = round(logu(24, 32) if corner == 0 else logu(2, 4) if corner == 1 else logu(2, 32))
    D = round(logu(16, 20) if corner == 0 else logu(200, 256) if corner == 1 else logu(16, 256))
    ratio = u(2.0, 3.0) if corner == 2 else u(0.5, 3.0)
    F = max(8, round(ratio * D))
    if corner == 0:  # many sources: fewer features pay for them
        F = max(8, min(F, FAMILY_COST // (S * D)))
    S = max(2, min(S, FAMILY_COST // (D * F)))
    F = max(8, min(F, FAMILY_COST // (S * D)))
    l0_cap = min(10.0, D / 4, F / 8)  # and p_active <= 1/8: sparse codes
    l0 = l0_cap if corner == 2 else logu(1, l0_cap)
    co = u(0.0, 0.5) if torch.rand((), generator=g) < 0.5 else 0.0
    profile = pick(["bump", "rise_fade", "rise", "mixed"])
    turn = torch.rand((), generator=g) < 0.5
    cfg = SyntheticConfig(
        n_sources=S, d_in=D, n_features=F,
        p_active=min(0.5, l0 / (F * (1 + co))),  # a partner's co-activation adds about p * co per feature
        max_rotation=u(0.0, 1.0), peak_width=u(1.0, 2.0), noise=logu(0.01, 0.1), profile=profile,
        peak_margin=u(0.15, 0.3), max_life=int(torch.randint(1, S + 1, (), generator=g)),
        turn_at=int(torch.randint(1, S, (), generator=g)) if turn else None,
        turn_frac=u(0.3, 0.8), turn_angle=u(0.5, 1.5),
        mag_noise=u(0.0, 0.3) if torch.rand((), generator=g) < 0.5 else 0.0, mag_corr=u(0.5, 0.95),
        noise_decay=u(0.0, 1.5), offset=u(0.0, 2.0), magnitude=pick(["exponential", "uniform", "lognormal", "constant"]),
        co_active=co, seed=seed)
    return cfg


class PlantedFeatures:
    """Ground truth (`directions`, `profiles`, `peak_index`, `turned`) and a sampler of activations."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        S, D, F = cfg.n_sources, cfg.d_in, cfg.n_features
        g = torch.Generator().manual_seed(cfg.seed)
        u = normalize(torch.randn(F, D, generator=g), dim=-1)
        v = torch.randn(F, D, generator=g)
        v = normalize(v - (v * u).sum(-1, keepdim=True) * u, dim=-1)  # rotation plane (u, v) per feature
        rate = cfg.max_rotation * (0.5 + 0.5 * torch.rand(F, generator=g))  # radians over all sources
        pos = torch.arange(S, dtype=torch.float32) / max(S - 1, 1)
        angle = rate[:, None] * pos[None, :]  # [F, S]
        turned = torch.zeros(F, dtype=torch.bool)
        if cfg.turn_at is not None:
            if not 0 < cfg.turn_at < S:
                raise ValueError(f"turn_at must be in 1..{S - 1}, got {cfg.turn_at}")
            turned = torch.rand(F, generator=g) < cfg.turn_frac
            jump = (torch.arange(S) >= cfg.turn_at).float() * cfg.turn_angle
            angle = angle + turned[:, None].float() * jump[None, :]
        dirs = torch.cos(angle)[..., None] * u[:, None] + torch.sin(angle)[..., None] * v[:, None]  # [F, S, D]
        self.directions: Float[Tensor, "n_sources n_features d_in"] = dirs.permute(1, 0, 2).contiguous()
        if cfg.profile == "mixed":
            kind = torch.randint(0, 3, (F,), generator=g)  # 0 bump, 1 rise_fade, 2 rise
            drawn = [_bump(cfg, g), _rise_fade(cfg, g), _rise(cfg, g)]
            prof = torch.stack([p for p, _ in drawn])[kind, torch.arange(F)]
            peak = torch.stack([i for _, i in drawn])[kind, torch.arange(F)]
        else:
            prof, peak = {"bump": _bump, "rise_fade": _rise_fade, "rise": _rise}[cfg.profile](cfg, g)
        self.profiles: Float[Tensor, "n_features n_sources"] = prof
        self.peak_index: Tensor = peak
        self.turned = turned
        self.turn_at = cfg.turn_at
        # noise covariance factor (random basis, power-law spectrum, mean variance 1) and per-source offset
        basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
        spec = torch.arange(1, D + 1, dtype=torch.float32) ** -cfg.noise_decay
        self.noise_factor = basis * (spec / spec.mean()).sqrt()[None]  # noise = eps @ factor.T
        self.offsets = cfg.offset * normalize(torch.randn(S, D, generator=g), dim=-1)
        # drawn last, and only when used, so that co_active = 0 leaves every other draw as it was
        self.partner = torch.arange(F)
        if cfg.co_active > 0:
            perm = torch.randperm(F, generator=g)
            a, b = perm[0 : F - F % 2 : 2], perm[1 : F - F % 2 : 2]  # an odd feature out has no partner
            self.partner[a], self.partner[b] = b, a

    @property
    def planted_l0(self) -> float:
        """Expected number of active features per token: p_active, raised by a partner's co-activation."""
        p, c = self.cfg.p_active, self.cfg.co_active
        paired = (self.partner != torch.arange(self.cfg.n_features)).float()
        return float((p + paired * (1 - p) * p * c).sum())

    @property
    def alive(self) -> Tensor:
        """[n_features, n_sources] bool: the sources where each feature is alive (profile >= alive_frac)."""
        return self.profiles >= self.cfg.alive_frac

    @property
    def decoders(self) -> Float[Tensor, "n_features n_sources d_in"]:
        """Each feature's true decoder vector per source: profile * direction."""
        return self.profiles[..., None] * self.directions.permute(1, 0, 2)

    def sample(self, n: int, generator: torch.Generator) -> Float[Tensor, "n n_sources d_in"]:
        return self.sample_with_magnitudes(n, generator)[0]

    def sample_with_magnitudes(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x [n, n_sources, d_in], planted per-snapshot magnitudes [n, n_sources, n_features]): the norm of
        what feature i writes into source s on each token, a_i * profile[i, s] (* the lognormal factor)."""
        cfg = self.cfg
        F, S = cfg.n_features, cfg.n_sources
        active = torch.rand(n, F, generator=generator) < cfg.p_active
        if cfg.co_active > 0:
            active = active | (active[:, self.partner] & (torch.rand(n, F, generator=generator) < cfg.co_active))
        mags = _magnitudes(cfg.magnitude, n, F, generator)
        a = (active * mags)[:, None, :] * self.profiles.T[None]  # [n, S, F]
        if cfg.mag_noise > 0:
            eps = torch.randn(n, S, F, generator=generator)
            rho = cfg.mag_corr
            for s in range(1, S):  # AR(1) over sources, unit marginal variance
                eps[:, s] = rho * eps[:, s - 1] + (1 - rho**2) ** 0.5 * eps[:, s]
            a = a * torch.exp(cfg.mag_noise * eps - cfg.mag_noise**2 / 2)
        x = torch.einsum("nsf,sfd->nsd", a, self.directions)
        noise = torch.randn(x.shape, generator=generator) @ self.noise_factor.T
        return x + cfg.noise * noise + self.offsets, a

    def batch(self, step: int, batch_size: int, scale: Tensor | None = None) -> Float[Tensor, "batch n_sources d_in"]:
        """The batch of a given step: a pure function of (seed, step); multiplied by `scale[s]` if given."""
        g = torch.Generator().manual_seed(_mix(self.cfg.seed, step))
        x = self.sample(batch_size, g)
        return x if scale is None else x * scale[:, None]

    def batches(self, batch_size: int, start_step: int = 0, scale: Tensor | None = None) -> Iterator[Tensor]:
        step = start_step
        while True:
            yield self.batch(step, batch_size, scale)
            step += 1

    def batch_source(self, batch_size: int, scale: Tensor | None = None):
        """A callable `start_step -> iterator`, the resumable form `train` accepts."""
        return lambda start_step=0: self.batches(batch_size, start_step, scale)

    def norm_scale(self, n_tokens: int = 8192) -> Float[Tensor, " n_sources"]:
        """Per-source factor taking the mean activation norm to sqrt(d_in), as the activation store does."""
        x = self.batch(-1, n_tokens)
        return self.cfg.d_in**0.5 / x.norm(dim=-1).mean(0)


def _bump(cfg: SyntheticConfig, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Gaussian bumps around a uniform peak source: (profiles [F, S], peak index [F])."""
    S, F = cfg.n_sources, cfg.n_features
    src = torch.arange(S)[None].float()
    peak = torch.randint(0, S, (F,), generator=g)
    width = cfg.peak_width * (0.7 + 0.6 * torch.rand(F, generator=g))
    bump = torch.exp(-0.5 * ((src - peak[:, None]) / width[:, None]) ** 2)
    return cfg.profile_floor + (1 - cfg.profile_floor) * bump, peak


def _rise_fade(cfg: SyntheticConfig, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Birth, peak and death: zero outside [birth, death], linear from alive_floor to 1 - peak_margin next to
    the peak, 1 at the peak. The planted peak beats every other snapshot by peak_margin, so its exact index is
    well-defined."""
    S, F = cfg.n_sources, cfg.n_features
    src = torch.arange(S)[None].float()
    life = torch.randint(1, min(cfg.max_life or S, S) + 1, (F,), generator=g)  # snapshots alive
    birth = (torch.rand(F, generator=g) * (S - life + 1)).long()
    death = birth + life - 1
    peak_index = birth + (torch.rand(F, generator=g) * life).long()
    lo, hi = cfg.alive_floor, 1 - cfg.peak_margin
    peak = peak_index[:, None]
    rise = lo + (hi - lo) * (src - birth[:, None]) / (peak - 1 - birth[:, None]).clamp(min=1)
    fade = lo + (hi - lo) * (death[:, None] - src) / (death[:, None] - peak - 1).clamp(min=1)
    prof = torch.where(src < peak, rise, torch.where(src > peak, fade, torch.ones(())))
    return torch.where((src >= birth[:, None]) & (src <= death[:, None]), prof, torch.zeros(())), peak_index


def _rise(cfg: SyntheticConfig, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """A birth that persists: zero before the birth, linear from alive_floor at the birth to 1 - peak_margin at
    the second-last snapshot, 1 at the last (monotone; the last snapshot leads by peak_margin)."""
    S, F = cfg.n_sources, cfg.n_features
    src = torch.arange(S)[None].float()
    life = torch.randint(1, min(cfg.max_life or S, S) + 1, (F,), generator=g)  # snapshots alive, to the last
    birth = (S - life)[:, None]
    lo, hi = cfg.alive_floor, 1 - cfg.peak_margin
    rise = lo + (hi - lo) * (src - birth) / (S - 2 - birth).clamp(min=1)
    prof = torch.where(src == S - 1, torch.ones(()), rise)
    return torch.where(src >= birth, prof, torch.zeros(())), torch.full((F,), S - 1)


def _magnitudes(kind: str, n: int, F: int, g: torch.Generator) -> Float[Tensor, "n n_features"]:
    """Magnitudes of active features, mean 1.5 whatever the distribution (so p_active sets the same energy)."""
    if kind == "exponential":
        return torch.empty(n, F).exponential_(1.0, generator=g) + 0.5  # bounded away from 0
    if kind == "uniform":
        return 0.5 + 2 * torch.rand(n, F, generator=g)
    if kind == "lognormal":
        sd = 0.5  # exp(N(mu, sd^2)) has mean exp(mu + sd^2 / 2) = 1.5
        return torch.exp(torch.randn(n, F, generator=g) * sd + (math.log(1.5) - sd**2 / 2))
    if kind == "constant":
        return torch.full((n, F), 1.5)
    raise ValueError(f"magnitude must be exponential, uniform, lognormal or constant, got {kind!r}")


def _mix(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1)


@torch.no_grad()
def match_features(
    W_dec: Float[Tensor, "n_sources d_sae d_in"], truth: PlantedFeatures
) -> tuple[Float[Tensor, " n_features"], Tensor]:
    """Best-cosine match of each planted feature to a latent, cosines taken between decoder vectors
    concatenated over sources (the crosscoder's joint decoder direction). Returns (cosine, latent index)."""
    learned = W_dec.permute(1, 0, 2).reshape(W_dec.shape[1], -1).float()
    true = truth.decoders.reshape(truth.cfg.n_features, -1)
    cos = normalize(true, dim=-1) @ normalize(learned, dim=-1).T  # [n_features, d_sae]
    best, idx = cos.max(dim=1)
    return best, idx


@torch.no_grad()
def per_snapshot_match(
    W_dec: Float[Tensor, "n_sources d_sae d_in"], truth: PlantedFeatures
) -> tuple[Float[Tensor, " n_features"], Tensor, Float[Tensor, "n_features n_sources"]]:
    """Match judged per snapshot: for each planted feature, the latent whose worst decoder cosine over the
    sources where the feature is alive is largest. Returns (that worst cosine, latent, its cosine per source)."""
    true = normalize(truth.directions.float(), dim=-1)  # [S, F, D]
    learned = normalize(W_dec.float(), dim=-1)  # [S, H, D]
    cos = torch.einsum("sfd,shd->fhs", true, learned)  # [F, H, S]
    worst = cos.masked_fill(~truth.alive[:, None, :], float("inf")).amin(-1)
    best, idx = worst.max(dim=1)
    return best, idx, cos[torch.arange(len(idx)), idx]


@torch.no_grad()
def recovery_report(model, truth: PlantedFeatures, threshold: float = 0.9) -> dict:
    """Fraction of planted features recovered (one latent's decoder cosine >= threshold in *every* source
    where the feature is alive, `per_snapshot_match`) and, among those, the fraction whose peak source
    (argmax of the latent's decoder norm) is the planted one. The planted profiles are in raw units, so
    `model` must work on raw activations (norm scale folded in) and its raw decoder norms are compared
    (`decoder_norms()` would be in each source's normalised units). `concat_*` is the older criterion on
    decoders concatenated over sources, kept for comparison."""
    cos, idx, _ = per_snapshot_match(model.W_dec, truth)
    hit = cos >= threshold
    peak = model.W_dec.norm(dim=-1).T[idx].argmax(-1)
    peak_ok = peak == truth.peak_index
    ccos, _ = match_features(model.W_dec, truth)
    return {
        "frac_recovered": hit.float().mean().item(),
        "median_cos": cos.median().item(),
        "frac_peak_correct": peak_ok[hit].float().mean().item() if hit.any() else 0.0,
        "frac_peak_within_1": ((peak - truth.peak_index).abs() <= 1)[hit].float().mean().item() if hit.any() else 0.0,
        "concat_frac_recovered": (ccos >= threshold).float().mean().item(),
        "n_features": truth.cfg.n_features,
        "threshold": threshold,
    }
