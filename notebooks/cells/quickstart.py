"""Cells of notebooks/01_quickstart.ipynb."""

from cells.common import _REPO, Cell, code, md

CELLS: list[Cell] = [
    md("""
    # Quickstart: a whole study from Python

    One recipe runs the whole chain: a planted corpus → mini-Pythia pre-training with Pythia-spaced
    snapshots → activations at one hook in every snapshot → a crosscoder across the snapshots →
    per-feature decoder-norm timelines → layer geometry → the phase map → `report.html`.

    Every stage is cached under `runs/<name>/stages.json`, keyed by its resolved config and its inputs:
    run this notebook after `make demo` and it returns at once; change a knob and only the stages
    downstream of it run again. The demo recipe takes up to ~15 minutes on a 2-core CPU.
    """),
    code(f"""
    %matplotlib inline
    import os
    from pathlib import Path

    # Inputs: environment variables with defaults for real use (the tests point them at a tiny recipe).
    {_REPO}
    RECIPE = Path(os.environ.get("FE_RECIPE", REPO / "runs" / "demo.toml"))
    RUNS_ROOT = Path(os.environ.get("FE_RUNS_ROOT", REPO / "runs"))
    print(f"recipe {{RECIPE}}, run directories under {{RUNS_ROOT}}")
    """),
    md("""
    ## The recipe is a `RunConfig`

    Each TOML table is one stage's dataclass config (`[corpus]`, `[pretrain]`, `[harvest]`, `[train]`,
    `[analyze]`, `[geometry]`, `[phases]`); unknown keys are an error. Edit the object to try a
    variation, e.g. `cfg.train.crosscoder.k = 16` under a new `cfg.name`.
    """),
    code("""
    from evolution.pipeline import run_study
    from evolution.recipe import load_recipe

    cfg = load_recipe(RECIPE, root=str(RUNS_ROOT))
    print(f"run directory: {cfg.run_dir}")
    print(f"corpus: {cfg.corpus.source}, {cfg.corpus.n_train_seqs} rows x {cfg.corpus.seq_len} tokens")
    print(f"pre-training: {cfg.pretrain.steps} steps; hook {cfg.harvest.hook}")
    cc = cfg.train.crosscoder
    print(f"crosscoder: d_sae={cc.d_sae}, {cc.activation} (k={cc.k:g}), {cfg.train.steps} steps")
    """),
    code("""
    import pandas as pd

    records = run_study(cfg)  # skips every stage already done for this config
    pd.DataFrame(records).T[["finished", "seconds"]]
    """),
    md("""
    ## Open the run

    `evolution.load_run` reads the run directory lazily: `run.features` is one row per crosscoder
    feature (peak step, emergence, fade, shape group, type scores), `run.timelines` holds the
    decoder norms `[d_sae, n_snapshots]`, and the `plot_*` methods return matplotlib figures.
    """),
    code("""
    import evolution

    run = evolution.load_run(cfg.run_dir)
    print(run)
    run.features.head()
    """),
    md("""
    ## The phase map

    Loss against the corpus's unigram/bigram entropy, layer geometry, and the crosscoder's peak steps
    on one step axis. Each phase signal places the statistical → feature phase boundary at one step
    (dotted); the dashed black line is their median on the log-step axis (`03_phase_map` explains it).
    """),
    code("""
    import json

    from evolution.phases.stage import phase_map, read_run

    phases = json.loads((run.path / "phases.json").read_text())
    print(f"verdict: {phases['verdict']}; boundary: step {phases['boundary_step']} (CI {phases['boundary_ci']}); "
          f"signals agreeing within their CIs: {phases['agree']}")
    phase_map(read_run(run.path), phases)
    """),
    md("""
    ## Feature timelines

    Relative decoder norm `‖W_dec[s, i]‖ / max_s ‖W_dec[s, i]‖` of every alive feature in every snapshot,
    features sorted by the snapshot where they peak (Ge et al. 2025, Fig. 2).
    """),
    code("""
    run.plot_heatmap()
    """),
    md("""
    ## The five latest-peaking features

    Features whose decoder norm peaks latest are those the model formed last, in the feature phase.
    """),
    code("""
    alive = run.features[~run.features["dead"].astype(bool)]
    latest = alive.sort_values(["peak_step", "max_norm"], ascending=False).head(5)
    cols = [c for c in ("feature", "peak_step", "emergence_step", "fade_step", "max_norm", "group", "gt_type")
            if c in latest]
    latest[cols]
    """),
    code("""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for i in latest["feature"]:
        ax.plot(run.steps, run.timelines.rel_norms[i], "o-", ms=3, label=f"feature {i}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(run.steps) * 1.1)
    ax.set_xlabel("training step")
    ax.set_ylabel("relative decoder norm")
    ax.legend(fontsize=8)
    fig
    """),
    md("""
    ## Where to go next

    - `report.html` in the run directory: every figure with its explanation, opens from disk.
    - `analysis/browser/index.html`: the feature browser (timelines and top contexts per feature).
    - `02_feature_timelines`: timelines, groups, direction turns, types and contexts of the features.
    - `03_phase_map`: the evidence behind the phase boundary, and how robust it is.
    - `04_pythia_gpu`: the same analysis on real Pythia checkpoints with a GPU.
    """),
]
