"""The statistical and the feature phase of pre-training: where the boundary lies, and the evidence.

Each signal below places the boundary at one step; `phases(run_dir)` combines the usable ones and writes
`phases.json` and `figures/phase_map.png`.

(a) `loss_below_bigram`: first snapshot where the held-out loss falls below the held-out bigram
    reference (the add-α bigram model counted on the train tokens, scored on the same held-out tokens:
    `sources.references.heldout_entropies`): from there the model predicts better than a bigram table,
    so the token-statistics (statistical) phase is done. From the snapshots' own per-token losses
    (`eval/`, `evaluate/snapshots`) with a bootstrap CI (`signals.crossing`); without `eval/`, from the
    pre-training log's eval losses against the plug-in bigram entropy, without a CI (so not used).
(a') `kl_bigram_stop`: where the model stops tracking the bigram distribution: the interior minimum of
    KL(model ‖ bigram), followed by a rise beyond its CI (`signals.stops_tracking`); needs `eval/`.
    The KL to the unigram distribution and its minimum are reported under `kl_curves` (an earlier
    transition, unigram → bigram, not a boundary signal).
(b) `id_peak`: the step of the peak of the intrinsic dimension (TwoNN, mean over layers 1..L):
    representations expand, then compress (Razzhigaev et al. 2024, *The Shape of Learning*).
(c) `linearity_no_residual_peak`: the step where the blocks' own maps stop getting more linear (max of
    linearity without residual, mean over blocks); it falls as the model learns (Razzhigaev et al.
    2024, *Your Transformer is Secretly Linear*).
(d) `anisotropy_change`: the change point of the mean anisotropy (layers 1..L): the split of the
    snapshot sequence into two constant segments with the least squared error; the step is the first
    snapshot after the split.
(e) `crosscoder_turning_point`: `analysis/summary.json`'s `turning_point` with its verdict (used, or not used
    and why), the step around which most crosscoder features turn direction (Ge et al. 2025 see it near step
    1000 of Pythia).

(f) `alive_features_onset`: the feature-phase onset, the rising edge of the number of alive crosscoder
    features (decoder norm ≥ half its maximum) after its statistical-phase trough; CI over features
    (`phases/signals.rising_onset`).

A peak at the first or last measured snapshot is no rise-then-fall and is not used (recorded with the
reason). Combination (`phases/signals.combine_with_ci`): a signal without a bootstrap CI or that does
not beat its null is not used; the boundary is published only when at least two used signals agree
within their CIs, else `verdict: "inconclusive"` with the spread. The older 2×-of-the-median agreement
is kept under `retired_median_rule` for comparison (its boundary is not the verdict). Geometry signals get a CI from geometry.json's token
resamples (random halves, `signals.resample_ci`); without resamples they have no CI and are not used.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crosscoders.io import read_jsonl, write_json


@dataclass
class PhasesConfig:
    agree_factor: float = 2.0
    """A signal agrees with the boundary when its step is within this factor of it."""
    id_metric: str = "id_twonn"
    """geometry.json metric used for the intrinsic-dimension signal (id_twonn or id_mle)."""
    skip_embedding_layer: bool = True
    """Average layer metrics over layers 1..L (layer 0, the embedding, has no context to learn)."""
    n_boot: int = 200
    """Bootstrap resamples of the per-token signals (loss crossing, KL minimum)."""
    resample_unit: str = "sequence"
    """What the bootstrap resamples: "sequence" (per-row means; tokens of a row are correlated, so this
    is the honest unit) or "token"."""


# ---------------------------------------------------------------- signals (pure functions)


def _log_step(step: float) -> float:
    return math.log10(max(step, 1))


def loss_crossing(steps: Sequence[int], loss: Sequence[float], reference: float) -> dict:
    """First step where `loss` ≤ `reference` (signal (a))."""
    for s, v in zip(steps, loss, strict=True):
        if v <= reference:
            return {"step": int(s), "used": True, "loss": float(v), "reference": reference}
    best = min(loss) if len(loss) else None
    return {"step": None, "used": False, "reference": reference, "reason": f"eval loss never fell below {reference:.3f} (min {best})"}


def interior_peak(steps: Sequence[int], values: Sequence[float]) -> dict:
    """Step of the maximum; used only when it is neither the first nor the last snapshot."""
    v = np.asarray(values, float)
    if len(v) < 3 or not np.isfinite(v).any():
        return {"step": None, "used": False, "reason": f"need >= 3 snapshots with values, got {len(v)}"}
    i = int(np.nanargmax(v))
    out = {"step": int(steps[i]), "value": float(v[i]), "used": 0 < i < len(v) - 1}
    if not out["used"]:
        out["reason"] = "maximum at the edge of the measured steps: no rise-then-fall"
    return out


def change_point(steps: Sequence[int], values: Sequence[float], min_segment: int = 2) -> dict:
    """Best single split into two constant segments (least squares); step = first snapshot after it."""
    v = np.asarray(values, float)
    n = len(v)
    if n < 2 * min_segment or not np.isfinite(v).all():
        return {"step": None, "used": False, "reason": f"need >= {2 * min_segment} finite values, got {n}"}
    sse = [((v[:k] - v[:k].mean()) ** 2).sum() + ((v[k:] - v[k:].mean()) ** 2).sum() for k in range(min_segment, n - min_segment + 1)]
    k = min_segment + int(np.argmin(sse))
    before, after = float(v[:k].mean()), float(v[k:].mean())
    return {"step": int(steps[k]), "used": True, "before": before, "after": after, "sse_drop": float(1 - min(sse) / max(((v - v.mean()) ** 2).sum(), 1e-300))}


def combine(signals: dict[str, dict], agree_factor: float = 2.0) -> dict:
    """Median of the used signals on the log-step axis, and which of them agree with it."""
    used = {k: s["step"] for k, s in signals.items() if s.get("used") and s.get("step") is not None}
    if not used:
        return {"boundary_step": None, "agreement": {"n_used": 0, "agree": [], "disagree": [], "factor": agree_factor}}
    logs = {k: _log_step(s) for k, s in used.items()}
    centre = float(np.median(list(logs.values())))
    tol = math.log10(agree_factor) + 1e-12
    agree = sorted(k for k, u in logs.items() if abs(u - centre) <= tol)
    return {
        "boundary_step": int(round(10**centre)),
        "agreement": {
            "n_used": len(used),
            "agree": agree,
            "disagree": sorted(set(used) - set(agree)),
            "factor": agree_factor,
            "spread_factor": float(max(used.values()) / max(min(used.values()), 1)),
            "log10_mad": float(np.median([abs(u - centre) for u in logs.values()])),
        },
    }


# ---------------------------------------------------------------- reading a run


def _layer_mean(rows: list[list], skip_first: bool) -> list[float]:
    out = []
    for row in rows:
        vals = [v for v in (row[1:] if skip_first and len(row) > 1 else row) if v is not None]
        out.append(float(np.mean(vals)) if vals else float("nan"))
    return out


def references(run_dir: Path) -> dict[str, float] | None:
    """Unigram / bigram entropy (nats/token) from corpus/meta.json, else computed from the tokens."""
    meta_path = run_dir / "corpus" / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("unigram_entropy") is not None and meta.get("bigram_entropy") is not None:
            return {"unigram_entropy": meta["unigram_entropy"], "bigram_entropy": meta["bigram_entropy"]}
    tok_path = run_dir / "corpus" / "tokens.safetensors"
    if not tok_path.exists():
        return None
    from safetensors.torch import load_file

    from evolution.sources.references import bigram_entropy, unigram_entropy

    tokens = load_file(str(tok_path))["tokens"]
    bos = int(tokens[0, 0])
    return {"unigram_entropy": unigram_entropy(tokens, bos), "bigram_entropy": bigram_entropy(tokens, bos)}


def read_run(run_dir: str | Path) -> dict:
    """Everything the phase map reads, each part None when its stage has not run."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "pretrain" / "log.jsonl")
    geometry_path = run_dir / "geometry.json"
    summary_path = run_dir / "analysis" / "summary.json"
    features_path = run_dir / "analysis" / "features.csv"
    peak_steps = None
    if features_path.exists():
        with open(features_path, newline="") as f:
            peak_steps = [int(float(r["peak_step"])) for r in csv.DictReader(f) if r.get("peak_step") not in (None, "")]
    alive = alive_steps = None
    tl_path = run_dir / "analysis" / "timelines.safetensors"
    if tl_path.exists():  # alive = decoder norm at or above the emergence threshold in that snapshot
        from safetensors.torch import load_file

        t = load_file(str(tl_path))
        alive, alive_steps = (t["rel_norms"] >= 0.5).numpy(), t["steps"].tolist()
    from evolution.evaluate import read_eval

    snap_eval = read_eval(run_dir)
    return {
        "snap_eval": snap_eval,
        "alive": alive, "alive_steps": alive_steps,
        "train": [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r],
        "eval": [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r],
        "references": {**(references(run_dir) or {}), **(snap_eval["summary"]["references"] if snap_eval else {})} or None,
        "geometry": json.loads(geometry_path.read_text()) if geometry_path.exists() else None,
        "summary": json.loads(summary_path.read_text()) if summary_path.exists() else None,
        "peak_steps": peak_steps,
    }


def phase_signals(data: dict, cfg: PhasesConfig | None = None) -> dict[str, dict]:
    cfg = cfg or PhasesConfig()
    signals: dict[str, dict] = {}
    if data.get("snap_eval"):
        from evolution.phases.heldout import eval_signals

        signals.update(eval_signals(data["snap_eval"], cfg.n_boot, cfg.resample_unit))
    elif data["eval"] and data["references"]:
        steps, loss = zip(*data["eval"], strict=True)
        signals["loss_below_bigram"] = loss_crossing(steps, loss, data["references"]["bigram_entropy"])
    geo = data["geometry"]
    if geo:
        steps, m = geo["steps"], geo["metrics"]
        from evolution.phases.signals import resample_ci

        res = geo.get("resamples") or {}
        for name, metric, skip, kind in (("id_peak", cfg.id_metric, cfg.skip_embedding_layer, "peak"),
                                         ("linearity_no_residual_peak", "linearity_no_residual", False, "peak"),
                                         ("anisotropy_change", "anisotropy", cfg.skip_embedding_layer, "change")):
            if metric not in m:
                continue
            rule = interior_peak if kind == "peak" else change_point
            signals[name] = rule(steps, _layer_mean(m[metric], skip))
            if metric in res:  # res[metric][step][resample][layer] -> one layer-mean curve per resample
                curves = [_layer_mean([res[metric][i][r] for i in range(len(steps))], skip)
                          for r in range(len(res[metric][0]))]
                signals[name] = resample_ci(signals[name], steps, curves, kind)
    summary = data["summary"] or {}
    if summary.get("turning_point"):  # schedule-invariant, with edge check, null and CI (features/turning)
        t = summary["turning_point"]
        signals["crosscoder_turning_point"] = {k: t.get(k) for k in ("step", "used", "reason", "ci", "p_null", "peakedness")
                                               if t.get(k) is not None} | {"used": bool(t.get("used"))}
        signals["crosscoder_turning_point"]["effect"] = t.get("peakedness")
        signals["crosscoder_turning_point"]["effect_name"] = "largest / mean rate of direction change per log-step"
    if data.get("alive") is not None:
        from evolution.phases.signals import rising_onset

        signals["alive_features_onset"] = rising_onset(data["alive"], data["alive_steps"])
    return signals


def phases(run_dir: str | Path, cfg: PhasesConfig | None = None) -> dict:
    """Write `phases.json` (boundary step, each signal's step, agreement) and `figures/phase_map.png`."""
    from crosscoders.dataclass_cli import to_dict

    cfg = cfg or PhasesConfig()
    run_dir = Path(run_dir)
    data = read_run(run_dir)
    signals = phase_signals(data, cfg)
    from evolution.phases.signals import combine_with_ci

    result = {**combine_with_ci(signals), "signals": signals, "references": data["references"], "config": to_dict(cfg)}
    if data.get("snap_eval"):
        from evolution.phases.heldout import kl_curves

        result["kl_curves"] = kl_curves(data["snap_eval"], cfg.resample_unit, cfg.n_boot)
    # the retired rule (median of the used steps, agreement within a factor), named for what it is: not a verdict
    result["retired_median_rule"] = combine(signals, cfg.agree_factor)
    write_json(run_dir / "phases.json", result)
    from evolution.figures import save_figure

    save_figure(phase_map(data, result), run_dir / "figures" / "phase_map.png")
    return result


# ---------------------------------------------------------------- figure

_SIGNAL_PANEL = {
    "loss_below_bigram": "loss",
    "kl_bigram_stop": "kl",
    "linearity_no_residual_peak": "linearity_no_residual",
    "anisotropy_change": "anisotropy",
    "id_peak": "id",
    "crosscoder_turning_point": "crosscoder",
    "alive_features_onset": "crosscoder",
}


def _band(ax, steps, curve: dict, color: str, label: str) -> None:
    ax.plot(steps, curve["mean"], "o-", ms=2.5, lw=1, color=color, label=label)
    ax.fill_between(steps, curve["ci_low"], curve["ci_high"], color=color, alpha=0.25, lw=0)


def phase_map(data: dict, result: dict):
    """Loss with references, linearity ±residual, anisotropy, ID per layer, crosscoder peak steps, on
    one log-step axis; the boundary as a black dashed line and each signal's step as a dotted line."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    geo = data["geometry"]
    kl = result.get("kl_curves")
    panels = ["loss"] + (["kl"] if kl else []) + (["linearity", "linearity_no_residual", "anisotropy", "id"] if geo else [])
    panels += ["crosscoder"] if data["peak_steps"] or data["summary"] else []
    fig = Figure(figsize=(9, 2.1 * len(panels) + 0.6))
    axes = dict(zip(panels, fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0], strict=True))
    ax = axes["loss"]
    if data["train"]:
        ax.plot(*zip(*data["train"], strict=True), lw=0.6, alpha=0.5, color="C0", label="train loss")
    if data["eval"]:
        ax.plot(*zip(*data["eval"], strict=True), "o-", ms=3, color="C0", label="eval loss")
    refs = data["references"] or {}
    held = "heldout_bigram_entropy" in refs  # one estimator for the line and the signal (sources.references)
    for name, c in zip(("unigram_entropy", "bigram_entropy"), ("C1", "C2"), strict=True):
        key = f"heldout_{name}" if held else name
        if refs.get(key) is not None:
            ax.axhline(refs[key], color=c, ls="--", lw=1, label=key.replace("_", " ") + (f" (α={refs['heldout_alpha']:g})" if held else ""))
    if kl:
        _band(ax, kl["steps"], kl["nll"], "C3", "snapshot held-out loss (95% CI)")
        _band(axes["kl"], kl["steps"], kl["kl_unigram"], "C1", "KL(model ‖ unigram)")
        _band(axes["kl"], kl["steps"], kl["kl_bigram"], "C2", "KL(model ‖ bigram)")
        axes["kl"].set_ylabel("KL (nats/token)", fontsize=8)
    ax.set_ylabel("nats/token")
    if geo:
        steps, layers = geo["steps"], geo["layers"]
        cmap = colormaps["viridis"]
        for panel, metric in [("linearity", "linearity"), ("linearity_no_residual", "linearity_no_residual"),
                              ("anisotropy", "anisotropy"), ("id", result.get("config", {}).get("id_metric", "id_twonn"))]:
            rows = np.array([[np.nan if v is None else v for v in r] for r in geo["metrics"][metric]], float)
            for j, layer in enumerate(layers):
                if np.isfinite(rows[:, j]).any():
                    axes[panel].plot(steps, rows[:, j], "-", lw=1, color=cmap(j / max(len(layers) - 1, 1)), label=f"L{layer}")
            axes[panel].set_ylabel(metric.replace("_", " "), fontsize=8)
        axes["linearity"].legend(fontsize=6, ncol=min(len(layers), 7), loc="lower right")
    if "crosscoder" in axes:
        ax = axes["crosscoder"]
        if data["peak_steps"]:
            ps = np.array(data["peak_steps"], float)
            edges = np.unique(np.r_[0, np.geomspace(1, max(ps.max(), 2) * 1.01, 30)])
            ax.hist(ps, bins=edges, color="C4", alpha=0.7, label="feature peak steps")
        alive = result["signals"].get("alive_features_onset", {})
        if alive.get("counts") and data.get("alive_steps"):  # the feature-phase onset's own curve
            ax.plot(data["alive_steps"], alive["counts"], "k.-", lw=1, ms=3, label="alive features (≥ ½ max norm)")
        ax.set_ylabel("# features")
    for name, sig in result["signals"].items():
        if sig.get("step") is not None and _SIGNAL_PANEL.get(name) in axes:
            style = dict(color="C3", ls=":", lw=1.5) if sig.get("used") else dict(color="grey", ls=":", lw=1)
            axes[_SIGNAL_PANEL[name]].axvline(sig["step"], **style, label=f"{name} = {sig['step']}")
    b = result.get("boundary_step")
    all_steps = [s for s, _ in data["train"] + data["eval"]] + (geo["steps"] if geo else []) + (data["peak_steps"] or [])
    for ax in axes.values():
        if b is not None:
            ax.axvline(b, color="k", ls="--", lw=1.2)
        ax.set_xscale("symlog", linthresh=1)
        ax.legend(fontsize=6, loc="best")
    if all_steps:
        axes["loss"].set_xlim(0, max(all_steps) * 1.15)
    top = axes["loss"]
    title = "phase map"
    if b is not None:
        title += f": boundary ≈ step {b}, CI {result['boundary_ci']}\n(signals agreeing within their CIs: {', '.join(result['agree'])})"
        top.text(0.01, 1.02, "← statistical phase", transform=top.transAxes, fontsize=8, ha="left")
        top.text(0.99, 1.02, "feature phase →", transform=top.transAxes, fontsize=8, ha="right")
    else:
        title += ": " + result.get("explanation", "inconclusive") + "\n(no boundary is drawn)"
    fig.suptitle(title, fontsize=9)
    axes[panels[-1]].set_xlabel("step (symlog)")
    fig.tight_layout()
    return fig


def phases_stage(ctx) -> None:
    """The phases stage: the calibrated verdict and the phase map from what the earlier stages wrote."""
    phases(ctx.run_dir, ctx.cfg.phases)
