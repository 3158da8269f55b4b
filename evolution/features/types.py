"""Feature types on one scale: four scores in [0, 1], each against a null, per snapshot.

A feature's activation in snapshot s is the per-snapshot activation (DESIGN.md "Definitions";
`crosscoders.model.activations_per_snapshot`); the functions here take those activations as tensors, so
they work for any reader of the residual stream. Positions: BOS and position 0 are excluded by the caller
(`keep`). Each statistic is compared with the same statistic after shuffling what it reads (`n_null`
shuffles), and a **score** is "this much above chance":

    score = clip(stat − median(null), 0, 1),   z = (stat − mean(null)) / sd(null)

A feature **has** a type when z ≥ `z_level` (one-sided normal level ≈ 0.001 at z = 3) and score ≥
`min_score`; its type is the passing type with the largest score ("none" when none passes). A feature
that never fires on the stream gets NaN scores and type "inactive", never a score of 1.

Statistics (R² are the 2-fold cross-fitted, shrunken per-group R² of `probe_stats.GroupR2`):

- `current_token`: R²(current token) − max(R²(previous token), 0); null: token labels shuffled over positions.
- `previous_token`: R²(previous token) − max(R²(current token), 0); null: previous-token labels shuffled.
  (On a stream where consecutive tokens are correlated both R² borrow from each other; the difference
  says which token the feature reads.)
- `context`: R²(document), fitted on the first half of each row and scored on the second (and back), −
  max(R²(current token), 0); null: document labels shuffled over positions. A topic feature is constant
  within a document; a token feature is not, unless its token is.
- `induction`: on BOS + R + R (R random tokens) against the control BOS + R + R' (R' fresh random
  tokens), the mean activation over the second half m_rep versus m_ctrl: (m_rep − m_ctrl) / (m_rep +
  m_ctrl); null: the rep / control labels shuffled over sequences. (Olsson et al. 2022's repeated random
  tokens; the control removes what a feature does on any random tokens.)

Ge et al. 2025 (arXiv 2509.17196) sort features into previous-token, induction and context-dependent
types and find them forming in that order; `evolution.features.hierarchy` measures that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from evolution.features.probe_stats import FoldMoments, GroupR2, group_ids

TYPES = ("previous_token", "induction", "current_token", "context")


@dataclass
class TypeConfig:
    n_null: int = 8
    """Shuffles per statistic for its null (mean and sd of the null give z)."""
    z_level: float = 3.0
    """A score clears its null when z = (stat − mean null) / sd null reaches this."""
    min_score: float = 0.05
    """...and the score (stat − median null) reaches this."""
    max_groups: int = 4096
    """Token-identity groups (rarer tokens share one)."""
    seed: int = 0


def _r2(acts: Tensor, fold: Tensor, group: Tensor, n_groups: int, moments: FoldMoments) -> Tensor:
    g = GroupR2(n_groups, acts.shape[1])
    g.add(fold, group, acts)
    return g.r2(moments).double()


def _moments(acts: Tensor, fold: Tensor) -> FoldMoments:
    m = FoldMoments(acts.shape[1])
    m.add(fold, acts)
    return m


def _score(stat: Tensor, null: Tensor) -> dict[str, Tensor]:
    """score, z from a statistic [d] and its null [n_null, d]."""
    sd = null.std(0).clamp(min=1e-6)
    return {"score": (stat - null.median(0).values).clamp(0, 1), "z": (stat - null.mean(0)) / sd}


def stream_type_stats(
    acts: Float[Tensor, "n_seq seq_len d_sae"], tokens: Int[Tensor, "n_seq seq_len"],
    keep: Bool[Tensor, "n_seq seq_len"], cfg: TypeConfig | None = None,
) -> dict[str, dict[str, Tensor]]:
    """current-token, previous-token and context scores and z against their shuffled nulls (module docstring)."""
    cfg = cfg or TypeConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    n_seq, seq_len = tokens.shape
    cur, n_groups = group_ids(tokens, cfg.max_groups)
    prev = torch.cat([cur[:, :1], cur[:, :-1]], dim=1)
    doc = torch.arange(n_seq)[:, None].expand(-1, seq_len)
    seq_fold = (torch.arange(n_seq) % 2)[:, None].expand(-1, seq_len)
    half_fold = (torch.arange(seq_len) >= seq_len // 2).long()[None, :].expand(n_seq, -1)
    a = acts[keep].float()
    cur, prev, doc, seq_fold, half_fold = (t[keep] for t in (cur, prev, doc, seq_fold, half_fold))
    m_seq, m_half = _moments(a, seq_fold), _moments(a, half_fold)
    r2c = _r2(a, seq_fold, cur, n_groups, m_seq)
    r2p = _r2(a, seq_fold, prev, n_groups, m_seq)
    r2d = _r2(a, half_fold, doc, n_seq, m_half)
    base_c, base_p = r2c.clamp(min=0).nan_to_num(0), r2p.clamp(min=0).nan_to_num(0)
    stats = {"current_token": r2c - base_p, "previous_token": r2p - base_c, "context": r2d - base_c}
    nulls: dict[str, list[Tensor]] = {k: [] for k in stats}
    for _ in range(cfg.n_null):
        perm = torch.randperm(len(a), generator=g)
        nulls["current_token"].append(_r2(a, seq_fold, cur[perm], n_groups, m_seq) - base_p)
        nulls["previous_token"].append(_r2(a, seq_fold, prev[perm], n_groups, m_seq) - base_c)
        nulls["context"].append(_r2(a, half_fold, doc[perm], n_seq, m_half) - base_c)
    active = (a > 0).any(0)
    out = {}
    for k, stat in stats.items():
        s = _score(stat, torch.stack(nulls[k]))
        out[k] = {"stat": stat, **{n: torch.where(active, v, torch.nan) for n, v in s.items()}}
        out[k]["stat"] = torch.where(active, stat, torch.nan)
    return out


def induction_type_stats(
    rep: Float[Tensor, "n_seq half d_sae"], ctrl: Float[Tensor, "n_seq half d_sae"], cfg: TypeConfig | None = None,
) -> dict[str, Tensor]:
    """Induction score and z (module docstring): `rep` / `ctrl` are the activations over the second half
    (each copy's first token left out) of BOS + R + R and BOS + R + R'."""
    cfg = cfg or TypeConfig()
    g = torch.Generator().manual_seed(cfg.seed + 1)
    per_seq = torch.cat([rep.double().mean(1), ctrl.double().mean(1)])  # [2 n, d]
    n = rep.shape[0]

    def stat(x: Tensor) -> Tensor:
        mr, mc = x[:n].mean(0), x[n:].mean(0)
        return (mr - mc) / (mr.abs() + mc.abs()).clamp(min=1e-12)

    obs = stat(per_seq)
    null = torch.stack([stat(per_seq[torch.randperm(2 * n, generator=g)]) for _ in range(max(cfg.n_null, 2))])
    active = (per_seq.abs() > 0).any(0)
    return {k: torch.where(active, v, torch.nan) for k, v in {"stat": obs, **_score(obs, null)}.items()}


def assign_types(stats: dict[str, dict[str, Tensor]], cfg: TypeConfig | None = None) -> list[str]:
    """Per feature: the passing type with the largest score, "none" when none passes, "inactive" when
    every score is NaN (the feature never fires)."""
    cfg = cfg or TypeConfig()
    names = [t for t in TYPES if t in stats]
    score = torch.stack([stats[t]["score"] for t in names], 1)
    ok = torch.stack([(stats[t]["z"] >= cfg.z_level) & (stats[t]["score"] >= cfg.min_score) for t in names], 1)
    inactive = score.isnan().all(1)
    best = torch.where(ok, score.nan_to_num(-1), torch.full_like(score, -1)).argmax(1)
    return ["inactive" if d else (names[b] if o.any() else "none")
            for d, b, o in zip(inactive.tolist(), best.tolist(), ok, strict=True)]


def type_onset(types: np.ndarray, steps: list[int], present: np.ndarray | None = None) -> tuple[list[str], list[int | None]]:
    """From per-snapshot types `[d_sae, n_steps]`: each feature's type (its last typed snapshot's) and the
    first probed step from which it holds that type without interruption (when it became that type).

    `present[d_sae, n_steps]` (bool, optional): the feature counts as typed in a snapshot only where it is
    also present there (decoder norm ≥ half its maximum, `evolution.features.timelines`). Under the shared
    gate the per-snapshot activations f_i·n_s[i] differ between snapshots only by a scale, which no score
    sees, so the types alone are the same in every snapshot; presence is what dates them."""
    rows = np.asarray(types, dtype=object)
    pres = np.ones(rows.shape, bool) if present is None else np.asarray(present, bool)
    if pres.shape != rows.shape:
        raise ValueError(f"present has shape {pres.shape}, types {rows.shape}")
    final, onset = [], []
    for row, here in zip(rows, pres, strict=True):
        typed = [i for i, t in enumerate(row) if t not in ("none", "inactive")]
        if not typed:
            final.append("inactive" if all(t == "inactive" for t in row) else "none")
            onset.append(None)
            continue
        t = row[typed[-1]]
        held = [i for i in typed if row[i] == t and here[i]]
        if not held:
            final.append(str(t))
            onset.append(None)
            continue
        i = held[-1]
        while i > 0 and row[i - 1] == t and here[i - 1]:
            i -= 1
        final.append(str(t))
        onset.append(int(steps[i]))
    return final, onset
