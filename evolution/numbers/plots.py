"""The numbers figure: helix R² per layer, period strengths and the Fourier spectrum across snapshots.

Left: held-out helix R² against step for every residual point (solid), with the report layer's shuffled
null (dotted) and PCA / linear baselines (dashed). Middle: each period's strength at the report layer
(solid) with its null (dotted, same colour); vertical lines at the planted number mechanisms' learned
steps. Right: the report layer's spectrum (share of variance per period) as a step × period heatmap.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from evolution.figures import step_axis

LEARNED_STYLE = {"count": ("tab:brown", "--"), "add": ("tab:red", "-.")}


def _learned_lines(ax, learned: dict) -> None:
    for name, step in (learned or {}).items():
        if step is not None:
            color, ls = LEARNED_STYLE.get(name, ("0.4", ":"))
            ax.axvline(step, color=color, ls=ls, lw=1, label=f"{name} learned ({step})")


def numbers_figure(data: dict) -> Figure:
    steps, L = data["steps"], data["report_layer"]
    hooks = data["hooks"]
    fig = Figure(figsize=(17, 4.4), layout="constrained")
    ax1, ax2, ax3 = (fig.add_subplot(1, 3, i + 1) for i in range(3))
    col = lambda g, i: [row[i] for row in g]  # noqa: E731

    for i, hook in enumerate(hooks):
        ax1.plot(steps, col(data["helix_r2"], i), ".-", lw=1.2, ms=3, label=f"helix R² {hook}")
    ax1.plot(steps, col(data["shuffled_r2_null"], L), "k:", lw=1, label=f"shuffled-a null ({hooks[L]})")
    ax1.plot(steps, col(data["pca_r2"], L), "--", color="0.5", lw=1, label=f"PCA {2 * len(data['periods']) + 1} dims")
    ax1.plot(steps, col(data["linear_r2"], L), "--", color="tab:olive", lw=1, label="linear only")
    ax1.plot(steps, col(data["random_periods_r2"], L), "--", color="tab:cyan", lw=1, label="random periods (mean)")
    _learned_lines(ax1, data.get("learned_steps"))
    step_axis(ax1, steps, grid=True)
    ax1.set_ylim(max(ax1.get_ylim()[0], -0.5), 1.02)  # a badly fitting baseline can go far below 0
    ax1.set_ylabel("held-out R²")
    ax1.set_title("helix fit of the number tokens")
    ax1.legend(fontsize=6)

    for j, k in enumerate(data["strength"]):
        c = f"C{j}"
        ax2.plot(steps, col(data["strength"][k], L), ".-", color=c, lw=1.2, ms=3, label=f"T = {k}")
        ax2.plot(steps, col(data["strength_null"][k], L), ":", color=c, lw=0.9)
    _learned_lines(ax2, data.get("learned_steps"))
    step_axis(ax2, steps, grid=True)
    ax2.set_ylabel("variance share on top of the linear term")
    ax2.set_title(f"period strength at {hooks[L]} (dotted: null)")
    ax2.legend(fontsize=7)

    periods = data.get("spectrum_periods")
    spec = [row[L] for row in data["spectrum"]] if periods else None
    if spec and all(s is not None for s in spec):
        M = np.array(spec).T  # [period, step]
        im = ax3.imshow(M, aspect="auto", origin="lower", cmap="magma", interpolation="nearest")
        ticks = [i for i, p in enumerate(periods) if round(p, 6) in (100, 50, 20, 10, 5, 4, 2.5, 2)]
        ax3.set_yticks(ticks, [f"{periods[i]:g}" for i in ticks])
        xt = np.unique(np.linspace(0, len(steps) - 1, min(8, len(steps))).round().astype(int))
        ax3.set_xticks(xt, [str(steps[i]) for i in xt], rotation=45, fontsize=7)
        ax3.set_xlabel("step")
        ax3.set_ylabel("period T = N/k")
        fig.colorbar(im, ax=ax3, label="variance share (detrended)")
        ax3.set_title(f"Fourier spectrum over a at {hooks[L]}")
    else:
        ax3.set_axis_off()
    return fig


def layer_figure(fit_by_layer: list[dict], hooks: list[str], title: str = "") -> Figure:
    """One model: helix R² and baselines per layer (left), period strengths per layer with nulls (right)."""
    fig = Figure(figsize=(12, 4), layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x = np.arange(len(hooks))
    for key, style, label in (("helix_r2", "o-", "helix"), ("pca_r2", "s--", "PCA (same dims)"),
                              ("linear_r2", "^--", "linear only"), ("random_periods_r2", "v--", "random periods"),
                              ("shuffled_r2_null", "k:", "shuffled-a null"),
                              ("units_digit_r2", "x--", "units-digit lookup")):  # fmt: skip
        if key in fit_by_layer[0]:
            ax1.plot(x, [f[key] for f in fit_by_layer], style, ms=3, lw=1, label=label)
    ax1.set_xlabel("residual point (block input; last = final block output)")
    ax1.set_ylabel("held-out R²")
    ax1.legend(fontsize=7)
    ax1.set_title(title or "helix fit per layer")
    for j, k in enumerate(fit_by_layer[0]["strength"]):
        ax2.plot(x, [f["strength"][k] for f in fit_by_layer], ".-", color=f"C{j}", label=f"T = {k}")
        ax2.plot(x, [f["strength_null"][k] for f in fit_by_layer], ":", color=f"C{j}", lw=0.9)
    ax2.set_xlabel("residual point")
    ax2.set_ylabel("variance share on top of the linear term")
    ax2.set_title("period strength (dotted: shuffled null)")
    ax2.legend(fontsize=7)
    return fig
