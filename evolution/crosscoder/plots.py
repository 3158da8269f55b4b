"""The crosscoder stage's figure; returns a matplotlib `Figure` (no pyplot), callers save it."""

from __future__ import annotations

from matplotlib.figure import Figure


def quality_figure(ev: dict):
    """FVU and L0 of the crosscoder per snapshot: where the dictionary explains each snapshot well."""
    x = range(len(ev["sources"]))
    fig = Figure(figsize=(11, 3.2), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    a1.plot(x, ev["fvu"], "o-")
    a1.set_ylabel("FVU (held-out)")
    a2.plot(x, ev["l0"], "o-", color="C1", label="L0, source's encoder alone")
    a2.axhline(ev["l0_shared"], color="C2", ls="--", label=f"L0 of the shared code ({ev['l0_shared']:.1f})")
    a2.set_ylabel("active latents / token")
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.set_xticks(list(x), [s.removeprefix("step") for s in ev["sources"]], rotation=90, fontsize=7)
        a.set_xlabel("snapshot step")
        a.grid(alpha=0.3)
    fig.suptitle("crosscoder quality per snapshot")
    return fig
