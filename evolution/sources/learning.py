"""The pre-training loss figure: loss against step, with n-gram entropies as reference lines.

Left panel: train and eval loss, with the corpus's unigram entropy H(x_t) and conditional bigram
entropy H(x_t | x_{t-1}) drawn flat; loss reaching them marks the *statistical phase* (DESIGN.md).
Right panel (planted corpus): eval loss on the tokens of each mechanism, each with the reference it
must fall below to count as learned (`evolution.sources.references.learned_threshold`), and a marker at the first
eval step where it does (`learned_steps`). Steps are on a symlog axis (linear below 1) so that step 0
and the log-spaced early evaluations both show. Built on `matplotlib.figure.Figure` (no pyplot).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from crosscoders.io import read_jsonl
from evolution.figures import step_axis
from evolution.sources.references import LEARNED_BELOW, learned_threshold

COLORS = {"unigram": "tab:blue", "bigram": "tab:orange", "copy": "tab:green", "topic": "tab:purple",
          "count": "tab:brown", "add": "tab:red"}
REFERENCE_LABEL = {"uniform_model": "log V", "unigram_model": "unigram model", "bigram_model": "bigram model",
                   "cache_model": "cache model", "number_uniform_model": "log #numbers"}


def mechanism_reference(name: str, refs: Mapping[str, float | None] | float | None) -> tuple[float | None, str]:
    """(value, label) of the reference that mechanism `name` must fall below (`learned_threshold`)."""
    if refs is None or isinstance(refs, (int, float)):
        return refs, "reference"
    value = learned_threshold({name: dict(refs)}, name) if name in LEARNED_BELOW else refs.get("bigram_model")
    which = next((k for k, v in refs.items() if v is not None and v == value), "reference")
    return value, which


def learned_steps(log_rows: Sequence[Mapping], references: Mapping[str, Mapping | float | None]) -> dict[str, int | None]:
    """Per mechanism, the first eval step whose loss on that mechanism's tokens is below its reference.

    `references`: `corpus/meta.json`'s "mechanism_references" ({name: {"uniform_model", "unigram_model",
    "bigram_model"}}, thresholded by `references.learned_threshold`) or {name: float}. None: never learned (or no
    reference). Rows without "eval_loss_by_mechanism" are skipped."""
    evals = sorted((r for r in log_rows if "eval_loss_by_mechanism" in r), key=lambda r: r["step"])
    out: dict[str, int | None] = {}
    for name, refs in references.items():
        ref, _ = mechanism_reference(name, refs)
        out[name] = None
        if ref is None:
            continue
        for r in evals:
            loss = r["eval_loss_by_mechanism"].get(name)
            if loss is not None and loss < ref:
                out[name] = int(r["step"])
                break
    return out


def learning_onsets(log_rows: Sequence[Mapping], frac: float = 0.1, min_fall: float = 0.1) -> dict[str, int | None]:
    """Per mechanism, the **onset** of learning: the first eval step, after the loss's highest point before its
    lowest, where the loss on that mechanism's tokens has fallen by `frac` of that fall (the 10% point of a
    rise time). `learned_steps` says when a mechanism beats every model that cannot explain it; the onset says
    when the model starts to use it: on the demo copied tokens leave the unigram level at step ~175, far
    before they beat the cache model at 2,425 (a model that already reads earlier tokens of the context).
    None when the fall is below `min_fall` nats (nothing learned beyond noise)."""
    evals = sorted((r for r in log_rows if "eval_loss_by_mechanism" in r), key=lambda r: r["step"])
    names = sorted({k for r in evals for k in r["eval_loss_by_mechanism"]})
    out: dict[str, int | None] = {}
    for name in names:
        pts = [(int(r["step"]), float(r["eval_loss_by_mechanism"][name])) for r in evals
               if r["eval_loss_by_mechanism"].get(name) is not None]
        out[name] = None
        if len(pts) < 2:
            continue
        i_min = min(range(len(pts)), key=lambda i: pts[i][1])
        i_max = max(range(i_min + 1), key=lambda i: pts[i][1])
        fall = pts[i_max][1] - pts[i_min][1]
        if fall < min_fall:
            continue
        level = pts[i_max][1] - frac * fall
        out[name] = next(step for step, loss in pts[i_max:] if loss <= level)
    return out


def loss_figure(log_rows: Sequence[Mapping], meta: Mapping | None = None, title: str | None = None) -> Figure:
    """Loss against step. `meta` is `corpus/meta.json` (entropies, mechanism references) or None."""
    meta = meta or {}
    train = sorted((r for r in log_rows if "train_loss" in r), key=lambda r: r["step"])
    evals = sorted((r for r in log_rows if "eval_loss" in r), key=lambda r: r["step"])
    by_mech = [r for r in evals if "eval_loss_by_mechanism" in r]
    refs = meta.get("mechanism_references") or {}
    n_panels = 2 if by_mech else 1
    fig = Figure(figsize=(6.5 * n_panels, 4.3), layout="constrained")
    axes = [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]
    steps = [r["step"] for r in train + evals]

    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], color="0.6", lw=0.8, label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "k.-", lw=1.2, ms=3, label="eval")
    held = meta.get("heldout_bigram_entropy") is not None  # the phase signal's estimator (references.heldout_entropies)
    for key, label, style in (("unigram_entropy", "unigram", "--"), ("bigram_entropy", "bigram", ":")):
        key = f"heldout_{key}" if held else key
        label = f"held-out add-α {label} model (α={meta.get('heldout_alpha', 0.1):g})" if held else f"{label} entropy (plug-in)"
        if meta.get(key) is not None:
            ax.axhline(meta[key], color="tab:red", ls=style, lw=1.2, label=f"{label} = {meta[key]:.2f}")
    step_axis(ax, steps, grid=True)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss" if title is None else title)
    ax.legend(fontsize=8)

    if by_mech:
        ax = axes[1]
        names = list(dict.fromkeys(n for r in by_mech for n in r["eval_loss_by_mechanism"]))
        learned = learned_steps(by_mech, {n: refs.get(n) for n in names})
        for name in names:
            color = COLORS.get(name)
            pts = [(r["step"], r["eval_loss_by_mechanism"][name]) for r in by_mech if name in r["eval_loss_by_mechanism"]]
            (line,) = ax.plot(*zip(*pts, strict=True), ".-", ms=3, lw=1.2, color=color, label=name)
            ref, which = mechanism_reference(name, refs.get(name))
            if ref is None:
                continue
            ax.axhline(ref, color=line.get_color(), ls="--", lw=0.9, alpha=0.8,
                       label=f"{name}: {REFERENCE_LABEL.get(which, which)} {ref:.2f}")  # fmt: skip
            if learned.get(name) is not None:
                s = learned[name]
                ax.axvline(s, color=line.get_color(), ls=":", lw=0.9)
                ax.plot([s], [ref], "v", color=line.get_color(), ms=7)
                ax.annotate(f"{s}", (s, ref), textcoords="offset points", xytext=(3, 4), fontsize=7,
                            color=line.get_color())  # fmt: skip
        step_axis(ax, steps, grid=True)
        ax.set_ylabel("eval loss on the mechanism's tokens")
        ax.set_title("per planted mechanism (▼ = first step below its reference)")
        ax.legend(fontsize=7, ncol=2)
    return fig


def save_loss_figure(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Read `run_dir/pretrain/log.jsonl` or else `eval/summary.json` (+ `corpus/meta.json` if present), write
    `figures/loss.png`."""
    from evolution.figures import save_figure

    run_dir = Path(run_dir)
    log = run_dir / "pretrain" / "log.jsonl"
    ev_path = run_dir / "eval" / "summary.json"  # held-out references of the snapshot evaluation, when it ran
    if not log.exists() and not ev_path.exists():
        raise FileNotFoundError(f"neither {log} nor {ev_path} found: run pre-training or the evaluate stage first")
    meta_path = run_dir / "corpus" / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    summary = json.loads(ev_path.read_text()) if ev_path.exists() else None
    if summary is not None:
        meta = {**(meta or {}), **summary["references"]}
    # without a pre-training log (local: and hf: snapshots) the curve is the snapshots' own held-out loss
    rows = read_jsonl(log) if log.exists() else eval_rows(summary)
    out = Path(path) if path is not None else run_dir / "figures" / "loss.png"
    save_figure(loss_figure(rows, meta, title=None if log.exists() else "held-out loss per snapshot"), out)
    return out


def eval_rows(summary: Mapping) -> list[dict]:
    """`eval/summary.json`'s per-snapshot means as loss-log rows (eval_loss, eval_loss_by_mechanism)."""
    rows = []
    for r in summary["per_snapshot"]:
        row = {"step": r["step"], "eval_loss": r["nll"]}
        if r.get("loss_by_mechanism"):
            row["eval_loss_by_mechanism"] = r["loss_by_mechanism"]
        rows.append(row)
    return rows
