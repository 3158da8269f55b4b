"""Per-feature decoder-norm timelines across snapshots, and the turning point of feature directions.

A crosscoder trained over snapshots (Ge et al. 2025, *Evolution of Concepts in Language Model
Pre-Training*) gives every feature i one decoder vector per snapshot s, `W_dec[s, i, :]`. Its norm says
how much the feature is present in that snapshot; its direction says what it writes. Definitions
(one meaning each, as in DESIGN.md):

- `norms[i, s] = ||W_dec[s, i, :]||_2`; `rel_norms = norms / max_s norms` (0 for dead features).
- **peak index** `argmax_s norms[i, s]` and its step.
- **emergence**: the rising edge of the run above `threshold` (default 0.5) that holds the peak, i.e. the
  snapshot after the last one before the peak with `rel_norms < threshold` (0 when there is none). A
  feature present at initialisation that fades in the statistical phase and forms again later emerges
  where it forms again, not at step 0 (on the demo 803 of 1,024 features are above the threshold at
  step 0, and 660 of them dip below it by step 128). **present_from_start**: emergence index 0 — no rising edge was observed
  (left-censored): the feature is present from the first snapshot on, up to its peak.
- **fade**: the first snapshot after the peak from which on `rel_norms` stays below the threshold up to
  the last snapshot; None when the feature is still above the threshold in the final snapshot.
- `cos_to_final[i, s]`: cosine between the feature's decoder direction at s and at the final snapshot.
- **turning point** (Ge et al. 2025 see most features' directions turn around step ~1000 on Pythia):
  a logistic in log-step fitted to the norm-weighted mean angle to the final direction, with an edge
  check, a permutation null and a bootstrap CI over features (`evolution.features.turning`: the rule is
  schedule-invariant; the largest change per snapshot interval is not). `turning_index` is the first
  snapshot at or after the fitted turning step; each feature's own turn is its own fit's midpoint (-1
  when it does not turn); `turn_agreement` is the fraction of turning features whose own turn lies
  within one snapshot of the turning point. `turn[i, s]` =
  `(1 - cos(W_dec[s-1, i], W_dec[s, i])) * min(rel_norms[i, s-1], rel_norms[i, s])` is kept as the
  per-interval direction change for figures (it is not normalised by the interval's length).
- **groups** of timeline shapes, from two questions about the rel-norm profile (`GROUPS` explains them):
  did it emerge early (emergence index <= `early_frac * (n_sources - 1)`), and is it still above the
  threshold in the final snapshot. Features whose max norm is negligible are "dead".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import einops
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file
from torch import Tensor

from crosscoders.io import save_safetensors
from evolution.features.turning import TurnConfig, turning_point, turning_verdict

GROUPS: dict[str, str] = {
    "persistent": "emerges early and is still present in the final snapshot",
    "late-rising": "emerges after the early part of training and is still present at the end",
    "early-and-fading": "emerges early, then falls below the threshold before the end",
    "transient-middle": "emerges after the early part and fades again before the end",
    "dead": "negligible decoder norm in every snapshot",
}


@dataclass
class TimelineConfig:
    """How timelines are read off the decoder norms."""

    threshold: float = 0.5
    """Relative decoder norm (fraction of the feature's max) above which a feature counts as present."""
    emergence: str = "peak_run"
    """peak_run: the rising edge of the above-threshold run holding the peak (module docstring); first: the
    first snapshot above the threshold (DESIGN.md's original rule, which dates every feature present at
    initialisation to step 0 even when it fades in the statistical phase and forms again later)."""
    dead_norm_frac: float = 0.05
    """A feature is dead when its max norm is below this fraction of the 90th percentile of max norms."""
    early_frac: float = 1 / 3
    """Emergence at or before this fraction of the snapshot indices counts as early (for the groups)."""
    min_turn: float = 0.1
    """A feature turns when its norm-weighted angle drop within a `turning.TurnConfig.window` reaches this (radians)."""


def decoder_norms(W_dec: Float[Tensor, "n_sources d_sae d_in"]) -> Float[Tensor, "d_sae n_sources"]:
    return einops.rearrange(W_dec.float().norm(dim=-1), "n_sources d_sae -> d_sae n_sources")


def cos_to_final(W_dec: Float[Tensor, "n_sources d_sae d_in"], ref: int = -1) -> Float[Tensor, "d_sae n_sources"]:
    """Cosine of each snapshot's decoder direction to snapshot `ref`'s (default the final one)."""
    u = F.normalize(W_dec.float(), dim=-1)
    return einops.einsum(u, u[ref], "n_sources d_sae d_in, d_sae d_in -> d_sae n_sources")


def adjacent_cos(W_dec: Float[Tensor, "n_sources d_sae d_in"]) -> Float[Tensor, "d_sae n_intervals"]:
    """Cosine between the directions of consecutive snapshots; column s-1 is the pair (s-1, s)."""
    u = F.normalize(W_dec.float(), dim=-1)
    return einops.einsum(u[:-1], u[1:], "n_int d_sae d_in, n_int d_sae d_in -> d_sae n_int")


def pairwise_cos(
    W_dec: Float[Tensor, "n_sources d_sae d_in"], features: Tensor | list[int] | None = None, chunk: int = 1024
) -> Float[Tensor, "n_features n_sources n_sources"]:
    """Cosine between a feature's decoder directions in every pair of snapshots.

    The full tensor is d_sae * n_sources^2 floats (16k features x 32 snapshots: 64 MB), so pass
    `features` for a subset; the contraction runs in chunks of `chunk` features to bound memory.
    """
    idx = torch.arange(W_dec.shape[1]) if features is None else torch.as_tensor(features, dtype=torch.long)
    out = []
    for part in idx.split(chunk):
        u = F.normalize(W_dec[:, part].float(), dim=-1)
        out.append(einops.einsum(u, u, "s f d_in, t f d_in -> f s t"))
    return torch.cat(out) if out else torch.empty(0, W_dec.shape[0], W_dec.shape[0])


@dataclass
class Timelines:
    """Everything read off the decoder norms and directions; one row per feature."""

    steps: list[int]
    norms: Float[Tensor, "d_sae n_sources"]
    rel_norms: Float[Tensor, "d_sae n_sources"]
    peak_index: Int[Tensor, " d_sae"]
    emergence_index: Int[Tensor, " d_sae"]
    fade_index: Int[Tensor, " d_sae"]
    """-1 where the feature has not faded by the final snapshot."""
    dead: Bool[Tensor, " d_sae"]
    cos_to_final: Float[Tensor, "d_sae n_sources"]
    turn: Float[Tensor, "d_sae n_intervals"]
    """Norm-weighted direction change between consecutive snapshots (see the module docstring)."""
    turn_index: Int[Tensor, " d_sae"]
    """Each feature's own sharpest turn (snapshot index), -1 when below `min_turn` or dead."""
    groups: list[str]
    turning_index: int
    cfg: TimelineConfig = field(default_factory=TimelineConfig)
    turning: dict = field(default_factory=dict)
    """`evolution.features.turning.turning_point`: step, CI, used/reason, null, fraction turning there."""
    W_dec: Tensor | None = field(default=None, repr=False)
    """Kept (not saved) so pairwise cosines can be computed on demand."""

    @property
    def d_sae(self) -> int:
        return self.norms.shape[0]

    @property
    def max_norm(self) -> Float[Tensor, " d_sae"]:
        return self.norms.max(dim=1).values

    @property
    def peak_step(self) -> list[int]:
        return [self.steps[i] for i in self.peak_index.tolist()]

    @property
    def turning_point_step(self) -> int | None:
        """The turning point's step where it is used as a phase signal, else None (its verdict and the step it
        would have had: `turning`, `turning_verdict`)."""
        return self.turning.get("step") if self.turning.get("used") else None

    @property
    def turning_verdict(self) -> str:
        return turning_verdict(self.turning)

    @property
    def mean_turn(self) -> Float[Tensor, " n_intervals"]:
        alive = ~self.dead
        return self.turn[alive].mean(0) if alive.any() else torch.zeros(self.turn.shape[1])

    @property
    def mean_cos_to_final(self) -> Float[Tensor, " n_sources"]:
        """Mean cosine to the final direction over alive features, weighted by norm at each snapshot."""
        alive = ~self.dead
        w = self.rel_norms[alive]
        return (w * self.cos_to_final[alive]).sum(0) / w.sum(0).clamp_min(1e-12)

    @property
    def turn_agreement(self) -> float:
        turning = self.turn_index >= 0
        if not turning.any():
            return 0.0
        return float(((self.turn_index[turning] - self.turning_index).abs() <= 1).float().mean())

    def pairwise_cos(self, features: Tensor | list[int] | None = None) -> Tensor:
        if self.W_dec is None:
            raise ValueError("pairwise cosines need the decoder: compute the timelines from a crosscoder/W_dec")
        return pairwise_cos(self.W_dec, features)

    def _step_or_none(self, idx: Tensor) -> list[int | None]:
        return [self.steps[i] if i >= 0 else None for i in idx.tolist()]

    def to_frame(self) -> pd.DataFrame:
        """One row per feature: the `analysis/features.csv` columns (docs/architecture.md)."""
        df = pd.DataFrame({
            "feature": range(self.d_sae),
            "peak_index": self.peak_index.tolist(),
            "peak_step": self.peak_step,
            "emergence_step": self._step_or_none(self.emergence_index),
            "present_from_start": (self.emergence_index == 0).tolist(),
            "fade_step": self._step_or_none(self.fade_index),
            "max_norm": self.max_norm.tolist(),
            "final_rel_norm": self.rel_norms[:, -1].tolist(),
            "group": self.groups,
            "dead": self.dead.tolist(),
            "turn_step": self._step_or_none(self.turn_index),
            "cos_first_to_final": self.cos_to_final[:, 0].tolist(),
        })
        for col in ("emergence_step", "fade_step", "turn_step"):
            df[col] = df[col].astype("Int64")
        return df

    def summary(self) -> dict[str, Any]:
        alive = ~self.dead
        groups = pd.Series(self.groups).value_counts()
        peak_alive = torch.tensor(self.peak_step, dtype=torch.float)[alive]
        turning = {k: v for k, v in self.turning.items() if k != "feature_turn_index"}
        return {
            "turning_point": turning,
            "turning_point_step": self.turning_point_step,
            "turning_point_verdict": self.turning_verdict,
            "turn_agreement": self.turn_agreement,
            "turning_point_definition": "the snapshot where the norm-weighted mean angle of the decoder directions to "
            "their final direction falls fastest per unit log-step (a sliding window over log10(step+1)); used only "
            "where it does not move with the end of the schedule and clears its permutation null "
            "(evolution.features.turning)",
            "steps": list(self.steps),
            "n_features": self.d_sae,
            "n_alive": int(alive.sum()),
            "median_peak_step": float(peak_alive.median()) if alive.any() else None,
            "group_counts": {g: int(groups.get(g, 0)) for g in GROUPS},
            "group_meanings": GROUPS,
            "mean_turn": self.mean_turn.tolist(),
            "mean_cos_to_final": self.mean_cos_to_final.tolist(),
            "config": {k: getattr(self.cfg, k) for k in TimelineConfig.__dataclass_fields__},
        }

    def save(self, path: str | Path) -> None:
        """Write `timelines.safetensors` (tensors + steps; the groups are stored in features.csv)."""
        save_safetensors(path, {
            "steps": torch.tensor(self.steps, dtype=torch.long),
            "norms": self.norms, "rel_norms": self.rel_norms, "cos_to_final": self.cos_to_final,
            "peak_index": self.peak_index, "emergence_index": self.emergence_index,
            "fade_index": self.fade_index, "dead": self.dead, "turn": self.turn, "turn_index": self.turn_index,
        }, metadata={"turning_index": str(self.turning_index), "groups": ",".join(self.groups),
                     "turning": json.dumps({k: v for k, v in self.turning.items() if k != "feature_turn_index"}),
                     **{k: str(getattr(self.cfg, k)) for k in TimelineConfig.__dataclass_fields__}})

    @classmethod
    def load(cls, path: str | Path) -> Timelines:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no timelines at {path}: run `feature-evolution analyze` first")
        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        cfg = TimelineConfig(**{k: (meta[k] if k == "emergence" else float(meta[k]))
                                for k in TimelineConfig.__dataclass_fields__ if k in meta})
        groups = meta.get("groups", "").split(",") if meta.get("groups") else []
        return cls(steps=t["steps"].tolist(), norms=t["norms"], rel_norms=t["rel_norms"],
                   peak_index=t["peak_index"], emergence_index=t["emergence_index"], fade_index=t["fade_index"],
                   dead=t["dead"], cos_to_final=t["cos_to_final"], turn=t["turn"], turn_index=t["turn_index"],
                   groups=groups, turning_index=int(meta.get("turning_index", 0)), cfg=cfg,
                   turning=json.loads(meta.get("turning", "{}")))


def emergence_and_fade(
    rel_norms: Float[Tensor, "d_sae n_sources"], peak_index: Int[Tensor, " d_sae"], threshold: float,
    rule: str = "peak_run",
) -> tuple[Int[Tensor, " d_sae"], Int[Tensor, " d_sae"]]:
    """(rising edge of the above-threshold run holding the peak, first index after the peak from which rel
    stays below; -1 if none)."""
    above = rel_norms >= threshold
    n = rel_norms.shape[1]
    idx = torch.arange(n)
    if rule == "peak_run":
        last_below_before_peak = torch.where(~above & (idx[None, :] < peak_index[:, None]), idx, -1).max(dim=1).values
        emergence = last_below_before_peak + 1
    elif rule == "first":
        emergence = torch.where(above, idx, n).min(dim=1).values
    else:
        raise ValueError(f"TimelineConfig.emergence must be 'peak_run' or 'first', got {rule!r}")
    # last index at/after the peak that is still above the threshold; the fade is the snapshot after it
    after_peak = idx[None, :] >= peak_index[:, None]
    last_above = torch.where(above & after_peak, idx, -1).max(dim=1).values
    fade = torch.where(last_above < n - 1, last_above + 1, -1)
    return emergence.clamp_max(n - 1), fade


def group_shapes(emergence_index: Tensor, fade_index: Tensor, dead: Tensor, n_sources: int,
                 early_frac: float) -> list[str]:
    early = emergence_index <= early_frac * (n_sources - 1)
    present_at_end = fade_index < 0
    out = []
    for e, p, d in zip(early.tolist(), present_at_end.tolist(), dead.tolist(), strict=True):
        if d:
            out.append("dead")
        elif p:
            out.append("persistent" if e else "late-rising")
        else:
            out.append("early-and-fading" if e else "transient-middle")
    return out


def compute_timelines_from_W_dec(
    W_dec: Float[Tensor, "n_sources d_sae d_in"], steps: list[int], cfg: TimelineConfig | None = None,
    norm_scale: Float[Tensor, " n_sources"] | None = None,
) -> Timelines:
    """`norm_scale`: per-source factors the norms are read in (`compute_timelines`); the directions, and so every
    cosine, do not depend on them, so W_dec is never rescaled (a copy of it is 0.6 GB at Pythia-160M's width)."""
    cfg = cfg or TimelineConfig()
    W_dec = W_dec.detach().float().cpu()
    n_sources = W_dec.shape[0]
    if len(steps) != n_sources:
        raise ValueError(f"{len(steps)} steps given for a decoder with {n_sources} sources")
    norms = decoder_norms(W_dec)
    if norm_scale is not None:
        norms = norms * norm_scale.detach().float().cpu()[None, :]
    max_norm = norms.max(dim=1).values
    ref = torch.quantile(max_norm, 0.9) if max_norm.numel() else torch.tensor(0.0)
    dead = max_norm <= torch.clamp(cfg.dead_norm_frac * ref, min=1e-8)
    rel = torch.where(dead[:, None], torch.zeros_like(norms), norms / max_norm.clamp_min(1e-12)[:, None])
    peak = norms.argmax(dim=1)
    emergence, fade = emergence_and_fade(rel, peak, cfg.threshold, cfg.emergence)
    emergence, fade = emergence.masked_fill(dead, -1), fade.masked_fill(dead, -1)
    c_final = cos_to_final(W_dec)
    if n_sources > 1:
        weight = torch.minimum(rel[:, :-1], rel[:, 1:])
        turn = (1 - adjacent_cos(W_dec)).clamp_min(0) * weight
        tcfg = TurnConfig(min_drop=cfg.min_turn)
        ref = n_sources - 1 - tcfg.reference_drop  # an earlier snapshot, for the turning point's reference check
        c_ref = cos_to_final(W_dec, ref) if ref >= 3 else None
        turning = turning_point(c_final, rel, dead, steps, tcfg, cos_to_earlier=c_ref)
        turn_index = torch.tensor(turning["feature_turn_index"], dtype=torch.long)
        turning_index = int(turning["index"])
    else:
        turning = {}
        turn = torch.zeros(norms.shape[0], 0)
        turn_index = torch.full((norms.shape[0],), -1)
        turning_index = 0
    groups = group_shapes(emergence, fade, dead, n_sources, cfg.early_frac)
    return Timelines(steps=list(steps), norms=norms, rel_norms=rel, peak_index=peak, emergence_index=emergence,
                     fade_index=fade, dead=dead, cos_to_final=c_final, turn=turn, turn_index=turn_index,
                     groups=groups, turning_index=turning_index, cfg=cfg, W_dec=W_dec, turning=turning)


def compute_timelines(crosscoder: Any, steps: list[int], cfg: TimelineConfig | None = None) -> Timelines:
    """Timelines of a trained `Crosscoder` (anything with `W_dec[n_sources, d_sae, d_in]`).

    Norms are read in the crosscoder's training (normalised) units, like `Crosscoder.decoder_norms()`:
    a saved model has each source's activation scale folded into `W_dec`, and undoing it keeps the
    norms of different snapshots comparable whatever their raw activation scale."""
    return compute_timelines_from_W_dec(crosscoder.W_dec, steps, cfg, getattr(crosscoder, "norm_scale", None))

