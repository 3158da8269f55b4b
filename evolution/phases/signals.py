"""Phase signals with uncertainty, and the rule that publishes a boundary only when signals agree.

Every signal is a step with a 95% percentile **bootstrap CI** (over tokens for loss and KL, over features
for crosscoder signals), an **effect size** and a **null**; a signal that does not beat its null, sits at
the edge of the measured steps, or has no CI is *not used*, with the reason.

- `crossing`: first snapshot where the mean of d[token, s] (model NLL − held-out bigram NLL) is ≤ 0;
  effect = −mean d at the last snapshot (nats); null: no crossing (every bootstrap must cross, ≥ 95%).
- `interior_min`: the snapshot of the minimum of a per-token mean (KL from the model to the bigram
  distribution: where the model stops tracking the bigram statistics); effect = the dip of the minimum
  below both ends (nats); null: the same dip on token-bootstrap noise alone (curves minus their mean,
  minimum re-selected), p ≤ 0.05; a minimum at the first or last snapshot is no minimum.
- `stops_tracking`: **where the model stops tracking the bigram distribution**. With K(s) the mean
  over held-out tokens of KL(p_s(·|x_<t) ‖ q(·|x_{t−1})) (q the add-α bigram distribution counted on
  the train tokens, `evaluate/snapshots`), the step is the snapshot s* of the interior minimum of K
  (`interior_min`: not the first or last snapshot, dip below both ends beating the noise null), and it
  is used only when K then *rises beyond sampling noise*: the rise R = max_{s>s*} K(s) − K(s*) exceeds
  the same statistic (minimum re-selected) on token-bootstrap noise alone (curves minus their mean) in
  ≥ 95% of resamples (p ≤ 0.05); `rise_ci` is its 95% bootstrap CI at s*. A flat stretch after the
  minimum gives a positive R by selection alone, which is why R is judged against that null.
- `rising_onset`: the feature-phase onset from the number of alive crosscoder features per snapshot
  (alive = relative decoder norm at or above the emergence threshold of `evolution.features.timelines`).
  A crosscoder across snapshots often finds the count high at initialisation (a random embedding already
  separates tokens), falling through the statistical phase and rising again as features form (the demo:
  796 → 174 at step 32 → 755). So the onset is the rising edge **after the trough**: with m the snapshot
  of the minimum count before the maximum that follows it, the first snapshot after m where the count
  recovers `frac` of the rise (count ≥ c[m] + frac × (max_{s>m} c − c[m])); with no trough (m = 0) this is
  the rising edge from the start. Effect = rise / number of features; CI over features (bootstrap);
  null: no rise, i.e. not used when the rise is below `min_rise` of the features, when the count is
  highest at the first snapshot, or when the bootstrap does not find an onset in ≥ 95% of resamples.
  `decline` reports the statistical-phase side: the count at the first snapshot and at the trough.

`combine_with_ci`: the largest set of used signals whose CIs (on the log-step axis) share a common
point; with at least two of them the **boundary** is the geometric median of their steps and its CI
the intersection of theirs (verdict "boundary"); otherwise verdict "inconclusive", boundary None, and
the spread of the used steps is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _ci(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def _first_leq0(means: np.ndarray) -> np.ndarray:
    """Per row, first column with value ≤ 0 (-1 if none)."""
    hit = means <= 0
    return np.where(hit.any(-1), hit.argmax(-1), -1)


def crossing(d: np.ndarray, steps: Sequence[int], n_boot: int = 200, seed: int = 0) -> dict:
    """`d[token, snapshot]`: first snapshot where the token mean of d is ≤ 0, with a CI over tokens."""
    d = np.asarray(d, float)
    rng = np.random.default_rng(seed)
    k = int(_first_leq0(d.mean(0)[None])[0])
    boots = np.stack([d[rng.integers(len(d), size=len(d))].mean(0) for _ in range(n_boot)])
    kb = _first_leq0(boots)
    out = {"step": int(steps[k]) if k >= 0 else None, "effect": float(-d.mean(0)[-1]),
           "effect_name": "final loss below the reference (nats)", "frac_boot_crossing": float((kb >= 0).mean())}
    if k < 0:
        return {**out, "used": False, "reason": "never crosses the reference"}
    kb = np.where(kb >= 0, kb, len(steps) - 1)
    out["ci"] = [int(steps[int(np.percentile(kb, 2.5, method="lower"))]), int(steps[int(np.percentile(kb, 97.5, method="higher"))])]
    if k == 0:
        return {**out, "used": False, "reason": "below the reference from the first snapshot: no crossing seen"}
    if out["frac_boot_crossing"] < 0.95:
        return {**out, "used": False, "reason": f"only {out['frac_boot_crossing']:.0%} of token resamples cross"}
    return {**out, "used": True}


def interior_min(v: np.ndarray, steps: Sequence[int], n_boot: int = 200, seed: int = 0) -> dict:
    """`v[token, snapshot]`: the snapshot of the minimum of the token mean, its CI and the rise after it."""
    v = np.asarray(v, float)
    rng = np.random.default_rng(seed)
    m = v.mean(0)
    k = int(np.argmin(m))
    boots = np.stack([v[rng.integers(len(v), size=len(v))].mean(0) for _ in range(n_boot)])
    kb = boots.argmin(1)

    def dip(x: np.ndarray) -> np.ndarray:  # how far the minimum lies below both ends
        return np.minimum(x[..., 0], x[..., -1]) - x.min(-1)

    effect = float(dip(m))
    null = dip(boots - m[None])  # the same statistic on sampling noise alone (minimum re-selected)
    p = float((1 + (null >= effect).sum()) / (1 + n_boot))
    out = {"step": int(steps[k]), "value": float(m[k]), "effect": effect, "p_null": p,
           "effect_name": "dip of the minimum below both ends (nats)", "effect_ci": _ci(dip(boots)),
           "ci": [int(steps[int(np.percentile(kb, 2.5, method="lower"))]), int(steps[int(np.percentile(kb, 97.5, method="higher"))])]}
    if k in (0, len(m) - 1):
        return {**out, "used": False, "reason": "minimum at the edge of the measured steps: no fall-then-rise"}
    if p > 0.05:
        return {**out, "used": False, "reason": f"the dip does not beat sampling noise (p = {p:.3f})"}
    return {**out, "used": True}


def stops_tracking(kl: np.ndarray, steps: Sequence[int], n_boot: int = 200, seed: int = 0) -> dict:
    """`kl[unit, snapshot]` (KL from the model to the bigram distribution): the interior minimum, used
    when the rise after it is beyond its bootstrap CI (module docstring)."""
    kl = np.asarray(kl, float)
    out = interior_min(kl, steps, n_boot, seed)
    k = list(steps).index(out["step"])
    rng = np.random.default_rng(seed + 1)
    if k == len(steps) - 1:
        return out
    boots = np.stack([kl[rng.integers(len(kl), size=len(kl))].mean(0) for _ in range(n_boot)])
    m = kl.mean(0)
    rise = float(m[k + 1:].max() - m[k])

    def noise_rise(c: np.ndarray) -> float:  # R on a centred resample, its minimum re-selected
        j = int(np.argmin(c))
        return float(c[j + 1:].max() - c[j]) if j < len(c) - 1 else 0.0

    p = float((1 + sum(noise_rise(b - m) >= rise for b in boots)) / (1 + n_boot))
    out |= {"rise": rise, "rise_ci": _ci(boots[:, k + 1:].max(1) - boots[:, k]), "rise_p_null": p,
            "rule": "interior minimum of KL(model || bigram), then a rise beyond sampling noise"}
    if out["used"] and p > 0.05:
        out |= {"used": False, "reason": f"the rise after the minimum does not beat sampling noise (p = {p:.3f})"}
    return out


def _trough_onset(counts: np.ndarray, frac: float) -> tuple[int, int, float]:
    """(trough index m, onset index (-1 if none), rise) of an alive-count curve (module docstring)."""
    c = np.asarray(counts, float)
    if len(c) < 2 or c.max() <= 0:
        return 0, -1, 0.0
    # the trough: the minimum before the largest later maximum (each candidate m scored by its rise)
    later_max = np.maximum.accumulate(c[::-1])[::-1]  # max over s >= m
    rise = later_max - c
    m = int(np.argmax(rise))
    if rise[m] <= 0:
        return m, -1, 0.0
    j = m + 1 + int(np.argmax(c[m + 1:] >= c[m] + frac * rise[m]))
    return m, j, float(rise[m])


def rising_onset(alive: np.ndarray, steps: Sequence[int], frac: float = 0.5, n_boot: int = 200, seed: int = 0,
                 min_rise: float = 0.1) -> dict:
    """`alive[feature, snapshot]` (bool): the feature-phase onset, the rising edge of the alive count after
    its trough (module docstring); CI over features."""
    a = np.asarray(alive, bool)
    rng = np.random.default_rng(seed)
    counts = a.sum(0)
    m, k, rise = _trough_onset(counts, frac)
    out = {"step": int(steps[k]) if k >= 0 else None, "counts": counts.tolist(),
           "effect": rise / max(len(a), 1), "effect_name": "rise of the alive count after its trough / n features",
           "decline": {"first": int(counts[0]) if len(counts) else 0, "trough": int(counts[m]) if len(counts) else 0,
                       "trough_step": int(steps[m]) if len(counts) else None},
           "rule": "rising edge of the alive-feature count after its trough (half the rise)"}
    if k < 0:
        reason = "no alive features" if counts.max(initial=0) == 0 else \
            "the alive count is highest at the first snapshot and never rises again: no onset seen"
        return {**out, "used": False, "reason": reason}
    kb = np.array([_trough_onset(a[rng.integers(len(a), size=len(a))].sum(0), frac)[1] for _ in range(n_boot)])
    found = kb >= 0
    kb = np.where(found, kb, len(steps) - 1)
    out["ci"] = [int(steps[int(np.percentile(kb, 2.5, method="lower"))]), int(steps[int(np.percentile(kb, 97.5, method="higher"))])]
    out["frac_boot_onset"] = float(found.mean())
    if out["effect"] < min_rise:
        return {**out, "used": False, "reason": f"the count rises by {rise:.0f} of {len(a)} features (< {min_rise:.0%}): no onset seen"}
    if found.mean() < 0.95:
        return {**out, "used": False, "reason": f"only {found.mean():.0%} of feature resamples show an onset"}
    return {**out, "used": True}


def resample_ci(sig: dict, steps: Sequence[int], curves: Sequence[Sequence[float]], kind: str) -> dict:
    """A geometry signal (`kind` "peak": interior maximum; "change": two-segment change point) with a CI
    from token resamples: `curves[r]` is the same layer-mean curve measured on resample r (a random half
    of the tokens, `geometry.stage.resampled_metrics`). CI: 2.5/97.5 percentiles of the resamples' steps
    under the same rule. Effect at the full-sample index k: peak − max(first, last) ("peak"), or the
    mean after − mean before the split ("change"). Null: no such effect; the signal stays used only if
    every resample shows an effect of the full sample's sign (`frac_resamples_agree` = 1)."""
    if sig.get("step") is None or not len(curves):
        return sig
    c = np.asarray(curves, float)
    k = list(steps).index(sig["step"])
    if kind == "peak":
        ks = np.nanargmax(c, 1)
        eff = c[:, k] - np.maximum(c[:, 0], c[:, -1])
    else:
        ks = np.array([_best_split(r) for r in c])
        eff = np.array([r[k:].mean() - r[:k].mean() for r in c])
    full = float(np.nanmedian(eff))
    agree = float((np.sign(eff) == np.sign(full)).mean()) if full != 0 else 0.0
    out = {**sig, "ci": [int(steps[int(np.percentile(ks, 2.5, method="lower"))]), int(steps[int(np.percentile(ks, 97.5, method="higher"))])],
           "effect": full, "effect_ci": _ci(eff), "frac_resamples_agree": agree, "n_resamples": len(c),
           "effect_name": "peak above both ends" if kind == "peak" else "mean after − mean before the change"}
    if out.get("used") and agree < 1.0:
        out |= {"used": False, "reason": f"only {agree:.0%} of token resamples show the effect"}
    return out


def _best_split(v: np.ndarray, min_segment: int = 2) -> int:
    sse = [((v[:k] - v[:k].mean()) ** 2).sum() + ((v[k:] - v[k:].mean()) ** 2).sum() for k in range(min_segment, len(v) - min_segment + 1)]
    return min_segment + int(np.argmin(sse))


def _log(step: float) -> float:
    return math.log10(max(step, 1))


def combine_with_ci(signals: dict[str, dict]) -> dict:
    """The boundary only where >= 2 used signals agree within their CIs (module docstring)."""
    used = {k: s for k, s in signals.items() if s.get("used") and s.get("step") is not None and s.get("ci")}
    for s in signals.values():
        if s.get("used") and not s.get("ci"):
            s["used"], s["reason"] = False, "no CI: cannot tell agreement from chance"
    spread = None
    if used:
        lo, hi = min(s["step"] for s in used.values()), max(s["step"] for s in used.values())
        spread = {"min_step": lo, "max_step": hi, "factor": (hi / max(lo, 1)) if lo else None}
    best: list[str] = []
    for k in used:  # a common point of intervals is some interval's left end
        x = _log(used[k]["ci"][0])
        group = sorted(j for j, s in used.items() if _log(s["ci"][0]) - 1e-12 <= x <= _log(s["ci"][1]) + 1e-12)
        if len(group) > len(best):
            best = group
    out = {"n_used": len(used), "used": sorted(used), "agree": best if len(best) >= 2 else [], "spread": spread}
    if len(best) < 2:
        why = "no signal is usable" if not used else (
            "only one usable signal" if len(used) == 1 else "no two usable signals agree within their CIs")
        return {**out, "verdict": "inconclusive", "boundary_step": None, "boundary_ci": None,
                "explanation": f"inconclusive: {why}" + (
                    f"; used signals span steps {spread['min_step']}..{spread['max_step']}" if spread else "")}
    steps = [used[k]["step"] for k in best]
    b = int(round(10 ** float(np.median([_log(s) for s in steps]))))
    ci = [max(used[k]["ci"][0] for k in best), min(used[k]["ci"][1] for k in best)]
    return {**out, "verdict": "boundary", "boundary_step": b, "boundary_ci": ci,
            "explanation": f"boundary at step {b} (CI {ci[0]}..{ci[1]}): {', '.join(best)} agree within their CIs"}
