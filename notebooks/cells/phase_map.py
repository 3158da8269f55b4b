"""Cells of notebooks/03_phase_map.ipynb."""

from cells.common import _REPO, Cell, code, md

CELLS: list[Cell] = [
    md("""
    # The phase map: statistical phase, feature phase

    Early in pre-training a language model learns token statistics: its loss falls toward the unigram,
    then the bigram entropy of the corpus (the **statistical phase**). Then sparse features that use
    context form in superposition (the **feature phase**). Several independent signals place the
    boundary; this notebook shows each, and how the combined boundary depends on the choices made.
    """),
    code(f"""
    %matplotlib inline
    import json
    import os
    from pathlib import Path

    {_REPO}
    RUN = Path(os.environ.get("FE_RUN", REPO / "runs" / "demo"))
    """),
    md("""
    ## Loss against the unigram and bigram references

    Left: train and eval loss with the corpus's empirical unigram entropy H(x) and bigram conditional
    entropy H(x | previous token). Right (planted corpus): eval loss on the tokens of each mechanism
    against the best loss a unigram/bigram/cache model reaches on them; ▼ marks the first step the model
    beats that reference, i.e. when it learned the mechanism.
    """),
    code("""
    from crosscoders.io import read_jsonl
    from evolution.phases.loss import learned_steps, loss_figure

    log = read_jsonl(RUN / "pretrain" / "log.jsonl")
    meta = json.loads((RUN / "corpus" / "meta.json").read_text())
    if meta.get("mechanism_references"):
        print("first step below the mechanism's reference:", learned_steps(log, meta["mechanism_references"]))
    loss_figure(log, meta)
    """),
    md("""
    ## Layer geometry per snapshot

    From `geometry.json` (Razzhigaev et al. 2024): **linearity** of each block's map from layer l to
    l+1, with and without the residual (without it, it falls as the block learns non-linear features);
    **anisotropy** σ₁²/Σσᵢ² of the centred token embeddings; **intrinsic dimension** (TwoNN, with the
    MLE estimator as a cross-check), which expands then compresses during training.
    """),
    code("""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    geo = json.loads((RUN / "geometry.json").read_text())
    phases = json.loads((RUN / "phases.json").read_text())
    steps, layers = geo["steps"], geo["layers"]


    def per_layer(metric):
        return np.array([[np.nan if v is None else v for v in row] for row in geo["metrics"][metric]], float)


    panels = [("linearity", "linearity_no_residual"), ("anisotropy",), ("id_twonn", "id_mle")]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    cmap = colormaps["viridis"]
    for ax, metrics in zip(fig.subplots(1, 3), panels):
        for metric, ls in zip(metrics, ("-", "--")):
            vals = per_layer(metric)
            for j, layer in enumerate(layers):
                if np.isfinite(vals[:, j]).any():
                    ax.plot(steps, vals[:, j], ls, color=cmap(j / max(len(layers) - 1, 1)),
                            label=f"L{layer}" if ls == "-" else None)
        if phases.get("boundary_step") is not None:
            ax.axvline(phases["boundary_step"], color="k", ls=":", lw=1)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, max(steps) * 1.1)
        ax.set_xlabel("step")
        ax.set_title(" (solid) / ".join(metrics) + (" (dashed)" if len(metrics) > 1 else ""), fontsize=9)
        ax.legend(fontsize=6)
    fig
    """),
    code("""
    from evolution.geometry.stage import geometry_heatmap

    geometry_heatmap(geo, "anisotropy")
    """),
    md("""
    ## The phase signals and the boundary (`phases.json`)

    Each signal places the boundary at one step: the eval loss falling below the bigram entropy, the
    peak of the intrinsic dimension, the peak of linearity without residual, the change point of
    anisotropy, the crosscoder's turning point. A peak at the first or last snapshot is no
    rise-then-fall and is not used. The boundary is the median of the used signals on the log-step
    axis; a signal *agrees* when within `agree_factor` (2×) of it.
    """),
    code("""
    import pandas as pd

    table = pd.DataFrame(phases["signals"]).T.reindex(columns=["step", "used", "reason"])
    print(f"boundary ≈ step {phases['boundary_step']}; agreement: {phases['agreement']}")
    table
    """),
    code("""
    from evolution.phases.stage import PhasesConfig, combine, phase_map, phase_signals, read_run

    data = read_run(RUN)
    phase_map(data, phases)
    """),
    md("""
    ## Re-deriving the boundary

    The signals are pure functions of the run's files, so the boundary can be recomputed without
    writing anything. First a check that this reproduces `phases.json`; then the same signals judged
    with other `agree_factor`s (the boundary stays, which signals count as agreeing changes), and the
    boundary with each signal left out in turn (how much it rests on any single one).
    """),
    code("""
    cfg = PhasesConfig(**phases.get("config", {}))
    signals = phase_signals(data, cfg)
    again = combine(signals, cfg.agree_factor)
    assert again["boundary_step"] == phases["boundary_step"], (again, phases["boundary_step"])

    rows = []
    for factor in (1.25, cfg.agree_factor, 4.0, 10.0):
        r = combine(signals, factor)
        rows.append({"agree_factor": factor, "boundary_step": r["boundary_step"],
                     "agree": ", ".join(r["agreement"]["agree"]), "disagree": ", ".join(r["agreement"]["disagree"])})
    pd.DataFrame(rows)
    """),
    code("""
    used = [k for k, s in signals.items() if s.get("used")]
    pd.DataFrame([{"left out": k, "boundary_step": combine({n: s for n, s in signals.items() if n != k})["boundary_step"]}
                  for k in used])
    """),
    code("""
    wide = combine(signals, 4.0)
    phase_map(data, {**wide, "signals": signals, "config": phases.get("config", {})})
    """),
]
