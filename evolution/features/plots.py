"""Figures of feature timelines; each function returns a matplotlib `Figure`, callers save it.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot), so nothing depends on the
interactive backend and nothing leaks global state: they render with Agg when saved and show inline
in notebooks. Step axes are symlog (linear below 1) so that step 0 and a log-spaced schedule both fit,
as in the Ge et al. 2025 figures.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from evolution.features.timelines import GROUPS, Timelines
from evolution.features.types import TYPES
from evolution.figures import fig_ax, save_figure, step_axis  # noqa: F401  (save_figure re-exported)

TYPE_SCORE_COLUMNS = tuple(f"type_score_{t}" for t in TYPES)
"""The one family of type scores (evolution.features.types: statistic minus the median of its shuffled null,
in [0, 1]); every table, figure, browser and report column of a type score is one of these."""


def sort_by_peak(tl: Timelines) -> np.ndarray:
    """Alive features ordered by peak index, then emergence, then max norm (largest first)."""
    alive = np.flatnonzero(~tl.dead.numpy())
    keys = (-tl.max_norm.numpy()[alive], tl.emergence_index.numpy()[alive], tl.peak_index.numpy()[alive])
    return alive[np.lexsort(keys)]


def plot_heatmap(tl: Timelines, ax: Axes | None = None, max_features: int = 4000) -> Figure:
    """Relative decoder norm (feature x snapshot), features sorted by peak index."""
    fig, ax = fig_ax(ax, (8, 5))
    order = sort_by_peak(tl)
    if len(order) > max_features:  # keep the peak ordering, thin evenly
        order = order[np.linspace(0, len(order) - 1, max_features).round().astype(int)]
    img = tl.rel_norms.numpy()[order] if len(order) else np.zeros((1, len(tl.steps)))
    im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1)
    n = len(tl.steps)
    ticks = np.unique(np.linspace(0, n - 1, min(n, 12)).round().astype(int))
    ax.set_xticks(ticks, [str(tl.steps[i]) for i in ticks], rotation=60, fontsize=7)
    ax.set_xlabel("snapshot (training step)")
    ax.set_ylabel(f"feature ({len(order)} alive, sorted by peak)")
    ax.set_title("Relative decoder norm per snapshot")
    fig.colorbar(im, ax=ax, label="‖W_dec[s,i]‖ / max_s")
    return fig


def plot_peak_steps(tl: Timelines, ax: Axes | None = None) -> Figure:
    """How many alive features peak at each snapshot, on a log step axis."""
    fig, ax = fig_ax(ax)
    steps = np.array(tl.steps, dtype=float)
    counts = np.bincount(tl.peak_index.numpy()[~tl.dead.numpy()], minlength=len(steps))
    # bar edges halfway (geometrically, where possible) between neighbouring snapshots
    mids = np.sqrt(np.maximum(steps[:-1], 0.5) * steps[1:]) if len(steps) > 1 else np.array([])
    left = np.concatenate([[steps[0] - 0.5], mids])
    right = np.concatenate([mids, [steps[-1] * 1.05 + 1]])
    ax.bar(left, counts, width=right - left, align="edge", color="tab:blue", edgecolor="white")
    step_axis(ax, tl.steps)
    ax.set_ylabel("features peaking")
    ax.set_title(f"Peak step of {int(counts.sum())} alive features")
    return fig


def _example_panel(ax: Axes, tl: Timelines, idx: np.ndarray, title: str, n_examples: int, rng) -> None:
    rel = tl.rel_norms.numpy()
    pick = rng.choice(idx, size=min(n_examples, len(idx)), replace=False) if len(idx) else []
    for i in pick:
        ax.plot(tl.steps, rel[i], lw=0.9, alpha=0.6, label=f"#{i}")
    if len(idx):
        ax.plot(tl.steps, np.median(rel[idx], axis=0), color="k", lw=2, label="median")
    step_axis(ax, tl.steps)
    ax.set_ylim(-0.02, 1.05)
    head, _, meaning = title.partition(": ")
    ax.set_title(f"{head} (n={len(idx)})" + ("\n" + textwrap.fill(meaning, 45) if meaning else ""), fontsize=8)
    ax.legend(fontsize=6, loc="best")


def _grid(n: int) -> tuple[Figure, list[Axes]]:
    cols = min(n, 3)
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, k + 1) for k in range(max(n, 1))]
    return fig, axes


def plot_timelines_by_group(tl: Timelines, n_examples: int = 5, seed: int = 0) -> Figure:
    """A few example rel-norm timelines and the median per shape group (dead features left out)."""
    groups = np.array(tl.groups)
    present = [g for g in GROUPS if g != "dead" and (groups == g).any()]
    fig, axes = _grid(len(present))
    rng = np.random.default_rng(seed)
    for ax, g in zip(axes, present, strict=False):
        _example_panel(ax, tl, np.flatnonzero(groups == g), f"{g}: {GROUPS[g]}", n_examples, rng)
    fig.supylabel("relative decoder norm")
    return fig


def feature_types(features: pd.DataFrame) -> pd.Series | None:
    """Each feature's type, the `type` column (its passing null-referenced type score; "none" / "inactive"
    left out), or None when the probes did not run."""
    if "type" not in features:
        return None
    return features["type"].where(~features["type"].isin(["none", "inactive"]))


def plot_timelines_by_type(tl: Timelines, features: pd.DataFrame, n_examples: int = 5, seed: int = 0) -> Figure | None:
    """Like `plot_timelines_by_group` but per feature type; None when the table has no type columns."""
    types = feature_types(features)
    if types is None:
        return None
    alive = ~tl.dead.numpy()
    names = sorted(t for t in types.dropna().unique())
    fig, axes = _grid(len(names))
    rng = np.random.default_rng(seed)
    for ax, t in zip(axes, names, strict=False):
        idx = np.flatnonzero((types.to_numpy() == t) & alive)
        _example_panel(ax, tl, idx, f"type: {t}", n_examples, rng)
    fig.supylabel("relative decoder norm")
    return fig


def plot_cos_to_final(tl: Timelines, ax: Axes | None = None) -> Figure:
    """Norm-weighted mean cosine of each snapshot's decoder direction to the final one; turning point marked."""
    fig, ax = fig_ax(ax)
    alive = ~tl.dead
    c = tl.cos_to_final[alive].numpy()
    ax.plot(tl.steps, tl.mean_cos_to_final.numpy(), color="tab:blue", lw=2, label="mean (norm-weighted)")
    if len(c):
        lo, hi = np.quantile(c, [0.25, 0.75], axis=0)
        ax.fill_between(tl.steps, lo, hi, color="tab:blue", alpha=0.2, label="25–75% of features")
    if tl.turn.shape[1]:
        turn = torch.cat([torch.zeros(1), tl.mean_turn]).numpy()
        ax.plot(tl.steps, turn / max(turn.max(), 1e-12), color="tab:orange", lw=1, ls=":",
                label="mean direction change (scaled)")
    if tl.turning.get("step") is not None:  # drawn with its verdict; solid red only where it is used
        used = bool(tl.turning.get("used"))
        ax.axvline(tl.turning["step"], color="tab:red" if used else "0.5", ls="--",
                   label=textwrap.shorten(f"turning point: {tl.turning_verdict}", 90))
    step_axis(ax, tl.steps)
    ax.set_ylim(-0.1, 1.05)
    ax.set_ylabel("cos(W_dec[s,i], W_dec[final,i])")
    ax.set_title("Decoder direction against the final snapshot")
    ax.legend(fontsize=7, loc="lower right")
    return fig


FIGURES = {
    "heatmap.png": plot_heatmap,
    "peak_steps.png": plot_peak_steps,
    "timelines_by_group.png": plot_timelines_by_group,
    "cos_to_final.png": plot_cos_to_final,
}


def save_all(tl: Timelines, features: pd.DataFrame | None, out_dir: str | Path) -> list[Path]:
    """Write every figure (the file names `evolution/report/html` embeds) to `out_dir`."""
    out_dir = Path(out_dir)
    written = []
    for name, fn in FIGURES.items():
        save_figure(fn(tl), out_dir / name)
        written.append(out_dir / name)
    if features is not None and (fig := plot_timelines_by_type(tl, features)) is not None:
        save_figure(fig, out_dir / "timelines_by_type.png")
        written.append(out_dir / "timelines_by_type.png")
    return written
