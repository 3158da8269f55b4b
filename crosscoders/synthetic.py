"""Synthetic activations from known sparse features: the ground truth for crosscoder recovery tests.

Each planted feature i has, per source s, a unit direction `directions[s, i]` and a norm `profiles[i, s]`;
a token activates a random sparse set of features with magnitudes a_i >= 0 shared by all sources
(the same token seen by every snapshot), so

    x_s = sum_i a_i profiles[i, s] directions[s, i] + noise.

Directions turn smoothly over sources (a per-feature rotation in a random plane, angle growing with s),
and profiles rise, peak at a planted source and fade, like features forming and fading in training
(Ge et al. 2025). `turn_at` plants a sharp turn: at that source most features' directions jump by
`turn_angle` (Ge et al. see most directions turn around step ~1000).

Batches are a deterministic function of (seed, step), so `planted.batches(start_step)` is the resumable
batch source that `crosscoders.train.train` accepts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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
    seed: int = 0
    """Seed of the ground truth; batches use (seed, step)."""


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
        self.peak_index = torch.randint(0, S, (F,), generator=g)
        width = cfg.peak_width * (0.7 + 0.6 * torch.rand(F, generator=g))
        bump = torch.exp(-0.5 * ((torch.arange(S)[None] - self.peak_index[:, None]) / width[:, None]) ** 2)
        self.profiles: Float[Tensor, "n_features n_sources"] = cfg.profile_floor + (1 - cfg.profile_floor) * bump
        self.turned = turned
        self.turn_at = cfg.turn_at

    @property
    def decoders(self) -> Float[Tensor, "n_features n_sources d_in"]:
        """Each feature's true decoder vector per source: profile * direction."""
        return self.profiles[..., None] * self.directions.permute(1, 0, 2)

    def sample(self, n: int, generator: torch.Generator) -> Float[Tensor, "n n_sources d_in"]:
        cfg = self.cfg
        F = cfg.n_features
        active = torch.rand(n, F, generator=generator) < cfg.p_active
        mags = torch.empty(n, F).exponential_(1.0, generator=generator) + 0.5  # bounded away from 0
        a = active * mags
        x = torch.einsum("nf,fsd->nsd", a, self.decoders)
        return x + cfg.noise * torch.randn(x.shape, generator=generator)

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
def recovery_report(model, truth: PlantedFeatures, threshold: float = 0.9) -> dict:
    """Fraction of planted features recovered (best decoder cosine >= threshold) and, among those, the
    fraction whose peak source (argmax of decoder norm) is the planted one. The planted profiles are in
    raw units, so `model` must work on raw activations (norm scale folded in) and its raw decoder norms
    are compared (`decoder_norms()` would be in each source's normalised units)."""
    cos, idx = match_features(model.W_dec, truth)
    hit = cos >= threshold
    peak = model.W_dec.norm(dim=-1).T[idx].argmax(-1)
    peak_ok = peak == truth.peak_index
    return {
        "frac_recovered": hit.float().mean().item(),
        "median_cos": cos.median().item(),
        "frac_peak_correct": peak_ok[hit].float().mean().item() if hit.any() else 0.0,
        "frac_peak_within_1": ((peak - truth.peak_index).abs() <= 1)[hit].float().mean().item() if hit.any() else 0.0,
        "n_features": truth.cfg.n_features,
        "threshold": threshold,
    }

