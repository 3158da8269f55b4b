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
    from evolution.sources.learning import learned_steps, loss_figure

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
    rise-then-fall and is not used. Each signal carries a bootstrap CI; the verdict (below) publishes a
    boundary only where at least two used signals agree within their CIs, else "inconclusive".
    """),
    code("""
    import pandas as pd

    table = pd.DataFrame(phases["signals"]).T.reindex(columns=["step", "used", "reason"])
    print(f"verdict: {phases['verdict']}; boundary: {phases['boundary_step']} (CI {phases['boundary_ci']}); "
          f"agreeing within their CIs: {phases['agree']}")
    table
    """),
    md("""
    ## The verdict, and the statistical-phase probe: KL to the unigram and bigram distributions

    `run.phases` is `phases.json`. The boundary is published only when at least two usable signals (each
    with a bootstrap CI that beats its null) agree within their CIs; otherwise the verdict is
    "inconclusive" and the explanation says why. Every snapshot was also run on the held-out tokens
    (`eval/`): per token, KL(model ‖ unigram) and KL(model ‖ bigram), the reference distributions counted
    on the train tokens with add-α smoothing. KL to the bigram distribution falls while the model learns
    the bigram statistics, and rises once it uses more context: the interior minimum, followed by a rise
    beyond sampling noise, is **where the model stops tracking the bigram distribution**
    (`kl_bigram_stop`). Bands: 95% bootstrap CIs over held-out sequences.
    """),
    code("""
    import evolution
    from evolution.figures import step_axis

    ph = evolution.load_run(RUN).phases
    print(f"verdict: {ph['verdict']}: {ph['explanation']}")
    kl = ph.get("kl_curves")
    if kl:
        stop = ph["signals"]["kl_bigram_stop"]
        print(f"KL(model || bigram) minimum at step {stop['step']} (CI {stop.get('ci')}), used: {stop['used']}"
              + ("" if stop["used"] else f" ({stop['reason']})") + f"; smoothing α = {kl['alpha']}")
        fig = Figure(figsize=(7, 3.4), layout="constrained")
        ax = fig.add_subplot()
        for name, color in (("kl_unigram", "C1"), ("kl_bigram", "C2")):
            c = kl[name]
            ax.plot(kl["steps"], c["mean"], "o-", ms=3, color=color, label=name.replace("kl_", "KL(model || ") + ")")
            ax.fill_between(kl["steps"], c["ci_low"], c["ci_high"], color=color, alpha=0.25, lw=0)
        if stop.get("step") is not None:
            ax.axvline(stop["step"], color="C3" if stop["used"] else "grey", ls=":", label=f"kl_bigram_stop = {stop['step']}")
        step_axis(ax, kl["steps"], grid=True)
        ax.set_ylabel("nats/token")
        ax.legend(fontsize=8)
        display(fig)
    else:
        print("no eval/ in this run: run `feature-evolution evaluate RUN` then `feature-evolution phases RUN`")
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
    from evolution.phases.signals import combine_with_ci

    again = combine_with_ci(signals)  # seeded bootstraps: the same verdict as phases.json
    assert (again["verdict"], again["boundary_step"]) == (phases["verdict"], phases["boundary_step"]), again
    # below: the older rule (median of the used steps, agreement within a factor), for comparison

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
    phase_map(data, {**wide, "signals": signals, "config": phases.get("config", {}), "boundary_ci": None,
                     "agree": wide["agreement"]["agree"], "explanation": "older median rule"})
    """),
]
