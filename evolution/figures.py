"""Figure helpers every stage shares: a training-step axis, a figure-or-axes helper, an atomic PNG save.

Imports no stage of the study, so any of them can use it (the one-way rule of `docs/architecture.md`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from crosscoders.io import atomic_path


def fig_ax(ax: Axes | None, figsize=(7, 4)) -> tuple[Figure, Axes]:
    """The given axes and its figure, or a new constrained-layout figure with one axes."""
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def step_axis(ax: Axes, steps: Sequence[int], grid: bool = False) -> None:
    """Training step on a symlog x-axis: Pythia-like schedules are log-spaced early, linear late."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(min(min(steps, default=0), 0), max(max(steps, default=1), 1) * 1.08 + 1)
    ax.set_xlabel("training step (symlog)")
    if grid:
        ax.grid(alpha=0.3, which="both", lw=0.5)


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> None:
    """Write `fig` as PNG atomically (a crash never leaves half a file)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
