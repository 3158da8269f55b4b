"""The learning hierarchy, measured: when features of each type (and of each planted mechanism) emerge.

Ge et al. 2025 (arXiv 2509.17196) report previous-token features forming at ~1k–5k steps of Pythia,
induction features at ~10k–100k, context features last. Here, per group of features:

- **emergence** (defined once, `evolution.features.timelines`): the rising edge of the decoder norm, the
  snapshot where the run of ‖W_dec[s, i]‖ ≥ `threshold` × its maximum that holds the peak begins.
  A feature whose run begins at the first snapshot has no observed rising edge (left-censored:
  `present_from_start`); it is counted in `n_from_start` and left out of the emergence statistics, since
  "emerged at step 0" would be a reading of the schedule's start, not of training. Statistics are taken
  on the snapshot *index* (the schedule is the measuring stick) of the other features and reported as
  steps: median (lower median), IQR, and a 95% percentile bootstrap CI of the median over the group's
  features (`n_boot` resamples).
- groups `by="type"`: the measured type of `evolution.features.types` (column `type`); `by="mechanism"`:
  the planted mechanism a feature helps predict (`gt_type`), kept when its lift clears `min_lift`: for
  the mechanisms a current-token feature can carry (unigram, bigram) the lift over the label's base rate
  (`gt_lift`); for the ones that need more than the current token (copy, topic: `CONTEXT_MECHANISMS`) the
  lift over the token-matched baseline (`gt_token_lift`, `evolution.features.probes`), so that a token
  feature whose token often precedes a copied span is not counted as a copy feature.
- `at="peak"` reads the same statistics off the **peak snapshot** (`peak_step`) instead of the rising edge:
  when most features of every kind rise together at the onset of the feature phase, which kind reaches
  its full strength first is what still separates them. Features peaking at the first snapshot are
  counted in `n_from_start` and left out the same way.
- the **mechanism's learned step** (`pretrain/learned_steps.json`, `evolution.sources.learning.learned_steps`:
  first eval step where that mechanism's loss beats every reference that cannot explain it). A group is
  **matched** when its median emergence lies within one snapshot interval of the snapshot at or after
  the learned step; otherwise `note` says why (no features, never learned, k intervals apart).
  Types map to mechanisms by what they compute: current-token → bigram (x_{t+1} read off x_t),
  induction → copy, context → topic; previous-token features are the first half of the induction
  circuit (no mechanism of their own; they should not come after copy).
- the mechanism's **learning onset** (`pretrain/learning_onsets.json`, `evolution.sources.learning.learning_onsets`:
  where its loss has fallen 10% of the way from its highest to its lowest point) and `matched_onset`, the
  same one-interval rule against it: the learned step says when a mechanism beats every model that
  cannot explain it, the onset when the model starts to use it, and features can only form with the latter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

TYPE_MECHANISM = {"current_token": "bigram", "induction": "copy", "context": "topic", "previous_token": None}
EXPECTED_ORDER = ("unigram", "bigram", "previous_token", "copy")
"""The order the issue expects on the demo: unigram < bigram < previous-token <= induction/copy."""
CONTEXT_MECHANISMS = ("copy", "topic")
"""Mechanisms no current-token feature can carry: judged by the token-matched lift."""


def _index_at_or_after(steps: Sequence[int], step: float) -> int:
    return int(min(np.searchsorted(np.asarray(steps), step, side="left"), len(steps) - 1))


def _within_one(median_index: int, steps: Sequence[int], step: float) -> bool:
    """A group matches a step when its median lies within one snapshot interval of the snapshot at or after it."""
    return abs(median_index - _index_at_or_after(steps, step)) <= 1


def hierarchy(
    features: pd.DataFrame, steps: Sequence[int], learned_steps: Mapping[str, int | None] | None = None,
    by: str = "type", min_lift: float = 1.5, n_boot: int = 1000, seed: int = 0, at: str = "emergence",
    onsets: Mapping[str, int | None] | None = None,
) -> pd.DataFrame:
    """One row per group: n (features with an observed rising edge), n_from_start (present from the first
    snapshot, censored), median emergence step, IQR, bootstrap CI, mechanism, learned step, matched, note."""
    learned = dict(learned_steps or {})
    steps = [int(s) for s in steps]
    df = features[~features.get("dead", pd.Series(False, index=features.index)).astype(bool)]
    if at not in ("emergence", "peak"):
        raise ValueError(f"at must be 'emergence' or 'peak', got {at!r}")
    step_col = "emergence_step" if at == "emergence" else "peak_step"
    df = df[df[step_col].notna()]
    if by == "type":
        col = "type"
        if col not in df:
            return pd.DataFrame()
        df = df[~df[col].isin(["none", "inactive"]) & df[col].notna()]
    elif by == "mechanism":
        col = "gt_type"
        if col not in df:
            return pd.DataFrame()
        if "gt_lift" in df and min_lift > 0:
            df = df[clear_mechanism(df, min_lift).notna()]
        df = df[df[col].notna() & (df[col].astype(str) != "")]
    else:
        raise ValueError(f"by must be 'type' or 'mechanism', got {by!r}")
    groups = sorted(set(df[col].astype(str)) | (set(learned) if by == "mechanism" else set()))
    rng = np.random.default_rng(seed)
    rows = []
    for g in groups:
        all_idx = np.array([steps.index(int(s)) for s in df.loc[df[col].astype(str) == g, step_col]], int)
        idx = all_idx[all_idx > 0]
        n_start = int((all_idx == 0).sum())
        mech = g if by == "mechanism" else TYPE_MECHANISM.get(g)
        ls = learned.get(mech) if mech else None
        row = {"group": g, "by": by, "at": at, "n": len(idx), "n_from_start": n_start, "mechanism": mech,
               "learned_step": ls}
        if len(idx):
            q = np.percentile(idx, [25, 50, 75], method="lower")
            boot = np.percentile(rng.choice(idx, size=(n_boot, len(idx))), 50, axis=1, method="lower")
            lo, hi = np.percentile(boot, [2.5, 97.5], method="lower")
            row.update(median_step=steps[int(q[1])], q25_step=steps[int(q[0])], q75_step=steps[int(q[2])],
                       ci_lo_step=steps[int(lo)], ci_hi_step=steps[int(hi)], median_index=int(q[1]))
        onset = (onsets or {}).get(mech) if mech else None
        if onset is not None:
            row["onset_step"] = onset
            if len(idx):
                row["matched_onset"] = _within_one(row["median_index"], steps, onset)
        if mech is None:
            row["note"] = "no planted mechanism of its own"
        elif not len(idx):
            row["note"] = f"all {n_start} features of {g} are present from the first snapshot (no rising edge)" \
                if n_start else f"no features of {g} (after the filters)"
        elif ls is None:
            row["note"] = f"mechanism {mech} was never learned (no learned step)" if mech in learned else \
                f"no learned step for {mech} (not a planted corpus, or pretrain/learned_steps.json missing)"
        else:
            k = _index_at_or_after(steps, ls)
            row["learned_index"] = k
            row["matched"] = _within_one(row["median_index"], steps, ls)
            row["note"] = "" if row["matched"] else \
                f"median {at} {row['median_step']} is {abs(row['median_index'] - k)} intervals from step {steps[k]}"
        if n_start and len(idx) and n_start >= len(idx):
            row["note"] = (row.get("note", "") + "; " if row.get("note") else "") + \
                f"{n_start} of {n_start + len(idx)} features are present from the first snapshot (left out)"
        rows.append(row)
    return pd.DataFrame(rows)


def order_check(table: pd.DataFrame) -> list[dict]:
    """Consecutive pairs of `EXPECTED_ORDER` present in the table: is a's median emergence ≤ b's, and do
    the CIs separate them? Mechanism rows are matched by mechanism, type rows by type name."""
    med = {}
    for _, r in table.iterrows():
        if pd.notna(r.get("median_step")):
            key = r["group"]
            med[key] = (r["median_step"], r["ci_lo_step"], r["ci_hi_step"])
    present = [k for k in EXPECTED_ORDER if k in med]
    return [{"before": a, "after": b, "holds": bool(med[a][0] <= med[b][0]), "separated": bool(med[a][2] < med[b][1])}
            for a, b in zip(present, present[1:], strict=False)]


def hierarchy_figure(table: pd.DataFrame, features: pd.DataFrame | None = None, what: str = "emergence step (rising edge of the decoder norm)"):
    """Median emergence with IQR (thick) and bootstrap CI (thin) per group; ▼ = the mechanism's learned step,
    ▽ = its learning onset."""
    from matplotlib.figure import Figure

    t = table[table["median_step"].notna()] if "median_step" in table else table.iloc[:0]
    fig = Figure(figsize=(7, 0.5 * max(len(t), 2) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    for y, (_, r) in enumerate(t.iterrows()):
        ax.plot([r["q25_step"], r["q75_step"]], [y, y], color="C0", lw=6, alpha=0.5)
        ax.plot([r["ci_lo_step"], r["ci_hi_step"]], [y, y], color="k", lw=1.2)
        ax.plot([r["median_step"]], [y], "o", color="k")
        if pd.notna(r.get("learned_step")):
            ax.plot([r["learned_step"]], [y + 0.25], "v", color="C3", ms=8)
        if pd.notna(r.get("onset_step")):
            ax.plot([r["onset_step"]], [y + 0.25], "v", mfc="none", color="C3", ms=8)
    ax.set_yticks(range(len(t)), [f"{r['by']}: {r['group']} (n={r['n']}" + (f", +{int(r['n_from_start'])} from start)"
                                  if r.get("n_from_start", 0) else ")") for _, r in t.iterrows()], fontsize=8)
    ax.set_xscale("symlog", linthresh=1)
    hi = [v for c in ("q75_step", "ci_hi_step", "learned_step") if c in t for v in t[c].dropna()]
    ax.set_xlim(0, 1.6 * max(hi + [1]))  # steps are ≥ 0: no negative half of the symlog axis
    ax.set_xlabel(what)
    ax.set_title(f"learning hierarchy: median {what.split(' (')[0]}, IQR (bar), 95% CI (line)\n"
                 "▽ the mechanism's learning onset, ▼ its learned step (loss)", fontsize=9)
    return fig


def read_learned_steps(run, name: str = "learned_steps") -> dict | None:
    """`pretrain/<name>.json` of a run (learned_steps or learning_onsets), None when it has none."""
    import json
    from pathlib import Path

    p = Path(run) / "pretrain" / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def hierarchy_tables(features: pd.DataFrame, steps: Sequence[int], learned: Mapping | None,
                     at: str = "emergence", onsets: Mapping | None = None) -> pd.DataFrame:
    """The type table and the mechanism table, one frame (column `by`)."""
    parts = [hierarchy(features, steps, learned, by=b, at=at, onsets=onsets) for b in ("type", "mechanism")]
    return pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else pd.DataFrame()


def hierarchy_summary(run, features: pd.DataFrame, steps: Sequence[int], fig_dir=None) -> dict:
    """summary.json's "hierarchy": the table as records, the order check, the learned steps; the figure
    `hierarchy.png` in `fig_dir` when given and the table is not empty."""
    learned, onsets = read_learned_steps(run), read_learned_steps(run, "learning_onsets")
    table = hierarchy_tables(features, steps, learned, onsets=onsets)
    peak = hierarchy_tables(features, steps, learned, at="peak", onsets=onsets) if "peak_step" in features else pd.DataFrame()
    out = {"learned_steps": learned, "learning_onsets": onsets, "emergence": "rising edge of the decoder-norm run holding the peak "
           "(TimelineConfig.threshold); features present from the first snapshot are counted in n_from_start "
           "and left out (left-censored)",
           "table": [], "order": [], "peak": {"table": [], "order": []}}

    def records(t: pd.DataFrame) -> list[dict]:
        return [{k: (None if (not isinstance(v, str) and pd.isna(v)) else (v.item() if hasattr(v, "item") else v))
                 for k, v in r.items()} for r in t.to_dict("records")]

    if len(peak):
        out["peak"] = {"table": records(peak), "order": order_check(peak)}
    if len(table):
        out["table"] = records(table)
        out["order"] = order_check(table)
        if fig_dir is not None:
            from evolution.figures import save_figure

            save_figure(hierarchy_figure(table), fig_dir / "hierarchy.png")
            if len(peak):
                save_figure(hierarchy_figure(peak, what="peak step (largest decoder norm)"), fig_dir / "hierarchy_peak.png")
    return out


def clear_mechanism(features: pd.DataFrame, min_lift: float = 1.5) -> pd.Series:
    """Each feature's planted mechanism (`gt_type`) where it is clearly of it, else None: its activation's share
    of that mechanism is ≥ `min_lift` × the base rate (`gt_lift`) and, for the mechanisms that need more than
    the current token (`CONTEXT_MECHANISMS`), ≥ `min_lift` × the token-matched share (`gt_token_lift`), so a
    feature that fires on one token is never labelled copy. The one ground-truth label every output shows."""
    lift = features["gt_lift"] if "gt_lift" in features else pd.Series(np.inf, index=features.index)
    if "gt_token_lift" in features:
        lift = lift.where(~features["gt_type"].isin(CONTEXT_MECHANISMS), features["gt_token_lift"])
    return features["gt_type"].where((lift >= min_lift) & features["gt_type"].notna(), None)
