"""The turning point of feature directions, as a property of the model and not of the snapshot schedule.

Ge et al. 2025 (arXiv 2509.17196) see most crosscoder features turn their decoder direction around
step ~1000 of Pythia. Reading that off "the snapshot interval with the largest direction change" is an
artefact of the schedule: a change summed over an interval grows with the interval's length, so on
Pythia's schedule (log-spaced to 512, then every 1000) the rule lands on 512→1000, the widest interval
in log-step, whatever the model does. The rule here is schedule-invariant by construction:

- per feature i and snapshot s, the **angle to the final direction** θ[i, s] = arccos cos(W_dec[s, i],
  W_dec[-1, i]) (angles add along a rotation; 1 − cos does not);
- the population curve θ̄(s) = Σ_i r[i, s] θ[i, s] / Σ_i r[i, s] over alive features, weighted by the
  relative decoder norm r (a direction with no norm is unconstrained noise);
- θ̄ is read as a function of x = log10(step + 1), linearly interpolated between snapshots, and its
  **rate of change per unit log-step** is taken over sliding windows [u, u + h] (h = `window` decades,
  u on a fine grid): rate(u) = (θ̄(u) − θ̄(u + h)) / h. The **turning step** is 10^c − 1 at the centre c
  of the window(s) of largest rate; `index` is the first snapshot at or after it. The rate is a
  derivative in log-step, so the same drift sampled on another schedule gives the same c up to the
  schedules' resolution; the window keeps dense stretches of the schedule (Pythia's every-1000 steps
  are 0.01–0.3 decades apart) from turning snapshot-to-snapshot noise into large rates.
- **edge check**: a turning step in the first or last snapshot interval is not seen from both sides:
  not used.
- **null** (noise): the largest window rate of θ̄_b − θ̄ over bootstrap resamples b of the features,
  i.e. what the maximum picks out of sampling noise alone; p = share of those ≥ the observed rate.
  **effect size** `peakedness` = largest rate / mean rate over the whole span (1 for a drift uniform in
  log-step, which has no turning point). Used when p ≤ `alpha` and peakedness ≥ `min_peakedness`.
- **reference check**: θ is measured against the final snapshot, so a direction that keeps drifting to
  the end makes θ̄ fall fastest just before whichever snapshot is final (on the demo the turn found was
  2,524 with the schedule ending at 3,000, 2,314 ending at 2,750, 2,103 ending at 2,500: it followed the
  end). The rule is re-run with the last `reference_drop` snapshots removed and the angle taken to the
  new last one; when the turn moves by more than one snapshot, it is a property of where the schedule
  ends, not of the model: not used; a turn within the last `reference_drop` + 1 intervals cannot be
  checked this way and is not used either (`reference_check` records both).
- **uncertainty**: bootstrap over features (resample features, recompute θ̄ and its turning step): a
  percentile CI of the turning step.
- every feature gets the same rule on its own θ[i, :], its window drop weighted by its smaller relative
  norm at the window's ends; it **turns** when that drop is at least `min_drop` radians. The **fraction
  turning there** = share of alive features whose own turn lies within one window (or one snapshot) of
  the turning point, with a bootstrap CI over features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TurnConfig:
    window: float = 0.15
    """Width (decades of step) of the window the rate of direction change is measured over."""
    min_drop: float = 0.1
    """A feature turns when its norm-weighted angle drop within its best window reaches this (radians)."""
    n_boot: int = 200
    """Bootstrap resamples of the features for the CIs."""
    alpha: float = 0.05
    """Level of the noise null (bootstrap)."""
    min_peakedness: float = 2.0
    """Largest rate / mean rate needed for a turning point (1 = uniform drift in log-step)."""
    reference_drop: int = 2
    """Snapshots dropped from the end for the reference check (0: no check)."""
    seed: int = 0


def log_steps(steps) -> np.ndarray:
    return np.log10(np.asarray(steps, float) + 1)


def _windows(x: np.ndarray, h: float, n_grid: int = 400) -> tuple[np.ndarray, np.ndarray]:
    h = min(h, (x[-1] - x[0]) / 2)
    u = np.linspace(x[0], x[-1] - h, n_grid)
    return u, u + h


def _interp(x: np.ndarray, Y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Rows of Y[m, n] linearly interpolated at `at` (vectorised over rows)."""
    k = np.clip(np.searchsorted(x, at, side="right") - 1, 0, len(x) - 2)
    t = (at - x[k]) / (x[k + 1] - x[k])
    return Y[:, k] * (1 - t) + Y[:, k + 1] * t


def window_rates(x: np.ndarray, Y: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
    """(window centres [g], drop of each row of Y over each window [m, g]) for windows of width h in x."""
    lo, hi = _windows(x, h)
    Y = np.atleast_2d(Y)
    return (lo + hi) / 2, _interp(x, Y, lo) - _interp(x, Y, hi)


def _turn_centre(centres: np.ndarray, drops: np.ndarray) -> np.ndarray:
    """Per row, the mean centre of the windows whose drop is within 1e-9 of the row's largest."""
    best = drops.max(1, keepdims=True)
    tie = drops >= best - 1e-9 * np.maximum(np.abs(best), 1)
    return (tie * centres).sum(1) / tie.sum(1)


def _population_curve(theta: np.ndarray, rel: np.ndarray) -> np.ndarray:
    return (rel * theta).sum(0) / np.maximum(rel.sum(0), 1e-12)


def _population_turn(theta: np.ndarray, r: np.ndarray, x: np.ndarray, window: float):
    """(θ̄, window centres, window drops, turning centre c) of angles `theta` weighted by `r` on the log-steps `x`."""
    curve = _population_curve(theta, r)
    centres, drops = window_rates(x, curve[None], window)
    return curve, centres, drops, float(_turn_centre(centres, drops)[0])


def _index_at_or_after(x: np.ndarray, x0: np.ndarray | float) -> np.ndarray:
    return np.minimum(np.searchsorted(x, np.asarray(x0) - 1e-12, side="left"), len(x) - 1)


def turning_point(cos_to_final, rel_norms, dead, steps, cfg: TurnConfig | None = None, cos_to_earlier=None) -> dict:
    """The schedule-invariant turning point with its CI, null and the per-feature turns (module docstring).

    `cos_to_final`, `rel_norms`: `[d_sae, n_sources]`; `dead`: `[d_sae]` bool. Returns a JSON-able dict
    with `step`, `index`, `used`, `reason`, `ci` ([lo, hi] steps), `rate` (radians per decade),
    `p_null`, `fraction`, `fraction_ci`, and the per-feature `feature_turn_index` (-1: no turn).
    `cos_to_earlier` `[d_sae, n_sources]`: cosine of each snapshot's direction to snapshot
    n − 1 − `cfg.reference_drop`'s, for the reference check (skipped when None)."""
    cfg = cfg or TurnConfig()
    cos = np.asarray(cos_to_final, float)
    rel = np.asarray(rel_norms, float)
    alive = ~np.asarray(dead, bool)
    x = log_steps(steps)
    n = len(x)
    d_sae = cos.shape[0]
    out: dict = {"step": None, "index": n - 1, "used": False, "ci": None, "fraction": None, "fraction_ci": None,
                 "feature_turn_index": [-1] * d_sae, "window_decades": cfg.window,
                 "definition": "centre of the log-step window of width window_decades where the norm-weighted "
                               "mean angle to the final direction falls fastest (evolution.features.turning)"}
    if n < 4 or alive.sum() < 2:
        out["reason"] = f"need >= 4 snapshots and >= 2 alive features (have {n}, {int(alive.sum())})"
        return out
    theta = np.arccos(np.clip(cos[alive], -1, 1))
    r = rel[alive]
    m = len(theta)
    curve, centres, drops, c = _population_turn(theta, r, x, cfg.window)
    width = (x[-1] - x[0]) - (centres[-1] - centres[0])
    rate = float(drops.max() / width)
    idx = int(_index_at_or_after(x, c))
    rng = np.random.default_rng(cfg.seed)
    boot = np.stack([_population_curve(theta[pick], r[pick]) for pick in rng.integers(m, size=(cfg.n_boot, m))])
    lo, hi = np.percentile(_turn_centre(*window_rates(x, boot, cfg.window)), [2.5, 97.5])
    null = window_rates(x, boot - curve[None], cfg.window)[1].max(1) / width
    p = float((1 + (null >= rate).sum()) / (1 + cfg.n_boot))
    mean_rate = abs(float(curve[0] - curve[-1])) / max(x[-1] - x[0], 1e-12)
    peaked = rate / max(mean_rate, 1e-12)
    out.update(step=int(round(10**c - 1)), index=idx, x=c, rate=rate, p_null=p, peakedness=peaked,
               null_rate_q95=float(np.percentile(null, 95)),
               ci=[int(round(10**lo - 1)), int(round(10**hi - 1))],
               interval=[int(steps[max(idx - 1, 0)]), int(steps[idx])])
    reasons = []
    if c <= x[1] or c > x[n - 2]:
        reasons.append("the turn lies in the first or last snapshot interval: not seen from both sides")
    if p > cfg.alpha:
        reasons.append(f"the largest rate does not beat sampling noise (p = {p:.3f} > {cfg.alpha})")
    if peaked < cfg.min_peakedness:
        reasons.append(f"no peak in the rate: largest / mean rate = {peaked:.2f} < {cfg.min_peakedness}")
    k = cfg.reference_drop
    if cos_to_earlier is not None and k > 0 and n - k >= 4:
        theta_ref = np.arccos(np.clip(np.asarray(cos_to_earlier, float)[alive][:, : n - k], -1, 1))
        c_ref = _population_turn(theta_ref, r[:, : n - k], x[: n - k], cfg.window)[3]
        sub = {"step": int(round(10**c_ref - 1)), "index": int(_index_at_or_after(x[: n - k], c_ref))}
        interior = c <= x[n - k - 2]
        moved = abs(sub["index"] - idx) > 1
        out["reference_check"] = {"dropped": k, "last_step": int(steps[n - k - 1]), "step": sub["step"],
                                  "checkable": bool(interior), "moved": bool(interior and moved)}
        if not interior:
            reasons.append(f"the turn lies in the last {k + 1} snapshot intervals, where the angle to the final "
                           "direction falls by construction for any drift that lasts to the end (ending the schedule "
                           f"at step {steps[n - k - 1]} instead, the turn is found at {sub['step']}): not checkable")
        elif moved:
            reasons.append(f"the turn moves with the end of the schedule: ending at step {steps[n - k - 1]} instead of "
                           f"{steps[-1]}, it is found at {sub['step']} instead of {out['step']}")
    out["used"] = not reasons
    if reasons:
        out["reason"] = "; ".join(reasons)

    own_c, own_drop = window_rates(x, theta, cfg.window)
    lo_w, hi_w = _windows(x, cfg.window)
    weight = np.minimum(_interp(x, r, lo_w), _interp(x, r, hi_w))
    own_drop = own_drop * weight
    turns = own_drop.max(1) >= cfg.min_drop
    own_x = _turn_centre(own_c, own_drop)
    own_idx = np.where(turns, _index_at_or_after(x, own_x), -1)
    near = turns & ((np.abs(own_x - c) <= cfg.window) | (np.abs(own_idx - idx) <= 1))
    frac_b = np.array([near[pick].mean() for pick in rng.integers(m, size=(cfg.n_boot, m))])
    out["fraction"] = float(near.mean())
    out["fraction_ci"] = [float(v) for v in np.percentile(frac_b, [2.5, 97.5])]
    full = np.full(d_sae, -1)
    full[alive] = own_idx
    out["feature_turn_index"] = full.tolist()
    return out


def turning_verdict(turning: dict) -> str:
    """The turning point as every output states it: "step 250 (used)" or "step 2750 (not used: <reason>)";
    the one sentence the browser, the figures, the report and phases.json's signal share."""
    if turning.get("step") is None:
        return f"none ({turning.get('reason') or 'not computed'})"
    return f"step {turning['step']} (" + ("used" if turning.get("used") else f"not used: {turning.get('reason')}") + ")"
