"""Figures of the interventions stage: Δloss against step per block, greedy pruning, the logit lens heatmap."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from evolution.figures import fig_ax, save_figure, step_axis
from evolution.interventions.linear_replacement import MODES


def _blocks(data: dict) -> int:
    return len(data["snapshots"][str(data["steps"][0])]["blocks"])


def plot_delta_vs_step(data: dict) -> Figure:
    """Δloss of replacing (left: linear map, right: removing) each block, against step, with bootstrap CIs."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    steps = data["steps"]
    for ax, mode in zip(axes, MODES, strict=True):
        for blk in range(_blocks(data)):
            rows = [data["snapshots"][str(s)]["blocks"][blk][mode] for s in steps]
            d = np.array([r["delta"] for r in rows])
            lo, hi = np.array([r["ci"][0] for r in rows]), np.array([r["ci"][1] for r in rows])
            ax.plot(steps, d, marker="o", ms=3, label=f"block {blk}")
            ax.fill_between(steps, lo, hi, alpha=0.2)
        ax.axhline(data.get("tolerance", 0.05), color="grey", ls="--", lw=0.8, label="tolerance")
        ax.axhline(0, color="black", lw=0.5)
        step_axis(ax, steps, grid=True)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title("block → least-squares affine map" if mode == "linear" else "block removed (identity)")
        ax.set_ylabel("Δ eval loss (nats/token)")
    axes[0].legend(fontsize=7)
    return fig


def plot_pruning(data: dict, steps: list[int] | None = None) -> Figure:
    """Δloss against the number of blocks replaced together (most linear first), at a few snapshots."""
    all_steps = [s for s in data["steps"] if "prune" in data["snapshots"][str(s)]]
    if steps is None:
        idx = sorted({0, len(all_steps) // 2, len(all_steps) - 1}) if all_steps else []
        steps = [all_steps[i] for i in idx]
    fig, ax = fig_ax(None, figsize=(6, 4))
    for j, s in enumerate(steps):
        pr = data["snapshots"][str(s)]["prune"]
        for mode, ls in zip(MODES, ("-", ":"), strict=True):
            ks = [r["k"] for r in pr[mode]]
            ax.errorbar(ks, [r["delta"] for r in pr[mode]], ls=ls, marker="o", ms=3, capsize=2,
                        yerr=np.abs(np.array([r["ci"] for r in pr[mode]]).T - [r["delta"] for r in pr[mode]]),
                        color=f"C{j}", label=f"step {s}, {mode}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("blocks replaced (most linear first, by held-out R²)")
    ax.set_ylabel("Δ eval loss (nats/token)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.legend(fontsize=7)
    return fig


def plot_logit_lens(data: dict) -> Figure | None:
    """Heatmaps layer × step of the logit lens's loss and top-1 agreement with the final layer."""
    from evolution.geometry.stage import log_step_edges

    steps = [s for s in data["steps"] if "logit_lens" in data["snapshots"][str(s)]]
    if not steps:
        return None
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    for ax, key, cmap in zip(fig.subplots(1, 2), ("loss", "top1_agreement"), ("magma_r", "viridis"), strict=True):
        vals = np.array([data["snapshots"][str(s)]["logit_lens"][key] for s in steps], float)
        layers = list(range(vals.shape[1]))
        mesh = ax.pcolormesh(log_step_edges(steps), [-0.5] + [v + 0.5 for v in layers], vals.T, shading="flat", cmap=cmap)
        fig.colorbar(mesh, ax=ax, label=key)
        ticks = [s for s in steps if s == 0 or math.log2(max(s, 1)).is_integer() or s == steps[-1]]
        ax.set_xticks([math.log10(1 + s) for s in ticks], [str(s) for s in ticks], rotation=45, fontsize=7)
        ax.set_yticks(layers)
        ax.set_xlabel("step (log scale)")
        ax.set_ylabel("layer (resid_pre l; last = final output)")
        ax.set_title(f"logit lens: {key}")
    return fig


def plot_interventions(data: dict, fig_dir: str | Path) -> list[Path]:
    fig_dir = Path(fig_dir)
    paths = []
    figs = {"interventions_delta": plot_delta_vs_step(data), "interventions_pruning": plot_pruning(data),
            "logit_lens": plot_logit_lens(data)}
    for name, fig in figs.items():
        if fig is not None:
            save_figure(fig, fig_dir / f"{name}.png")
            paths.append(fig_dir / f"{name}.png")
    return paths
