"""Write the research notebooks `notebooks/*.ipynb` from the cell sources in this file.

    python notebooks/build.py           # regenerate every notebook (outputs cleared)
    python notebooks/build.py --check   # exit 1 when a committed notebook differs from its source here

The sources live here, as plain Python strings, so that a change to a notebook is an ordinary diff to
review; the .ipynb files are generated, committed without outputs, and executed top to bottom by
`tests/test_notebooks.py`. Each notebook's first code cell reads its inputs from `FE_*` environment
variables whose defaults are for real use; the tests point them at a tiny run.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

Cell = tuple[str, str]


def md(text: str) -> Cell:
    return ("markdown", textwrap.dedent(text).strip())


def code(*parts: str) -> Cell:
    """A code cell from one or more snippets, each dedented on its own."""
    return ("code", "\n\n".join(textwrap.dedent(p).strip() for p in parts))


# Defaults resolve against the repository root whether Jupyter runs in notebooks/ or in the root.
_REPO = 'REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()'

_SHOW_CONTEXTS = '''
def show_contexts(by_step: dict, n: int = 3) -> None:
    """Print a feature's top contexts per snapshot, the firing token in [[ ]]."""
    for step, ctxs in by_step.items():
        print(f"step {step}:")
        for c in ctxs[:n]:
            toks = [f"[[{t}]]" if j == c["highlight"] else t for j, t in enumerate(c["tokens"])]
            sep = "" if any(t.startswith(" ") for t in c["tokens"]) else " "  # BPE tokens carry their spaces
            print(f"  {c['activation']:7.3f}  " + sep.join(toks).replace("\\n", "⏎"))
'''

QUICKSTART: list[Cell] = [
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
    from evolution.pipeline import load_recipe, run_study

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

    from evolution.phases import phase_map, read_run

    phases = json.loads((run.path / "phases.json").read_text())
    print(f"boundary ≈ step {phases['boundary_step']}; agreeing signals: {phases['agreement']['agree']}")
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

TIMELINES: list[Cell] = [
    md("""
    # Feature timelines of a run

    A crosscoder trained across snapshots gives every feature `i` one decoder vector per snapshot `s`,
    `W_dec[s, i, :]`: its norm says how much of the feature the snapshot holds, its direction what the
    feature writes (Ge et al. 2025, *Evolution of Concepts in Language Model Pre-Training*). This
    notebook reads both off a finished run (`make demo` writes `runs/demo`).
    """),
    code(f"""
    %matplotlib inline
    import os
    from pathlib import Path

    {_REPO}
    RUN = Path(os.environ.get("FE_RUN", REPO / "runs" / "demo"))
    """),
    code("""
    import pandas as pd
    import torch
    from matplotlib.figure import Figure

    import evolution

    run = evolution.load_run(RUN)
    f = run.features
    alive = f[~f["dead"].astype(bool)]
    print(run)
    print(f"{len(alive)} alive features; snapshots at steps {run.steps}")
    """),
    md("""
    ## Relative decoder norms

    `rel_norms[i, s] = ‖W_dec[s, i]‖ / max_s ‖W_dec[s, i]‖`. The heatmap sorts features by peak snapshot.
    """),
    code("""
    run.plot_heatmap()
    """),
    md("""
    ## When features peak

    The **peak snapshot index** is `argmax_s ‖W_dec[s, i]‖`; the histogram counts alive features per
    peak step on a log step axis.
    """),
    code("""
    print(f"median peak step of alive features: {alive['peak_step'].median():g}")
    run.plot_peak_steps()
    """),
    md("""
    ## Emergence and fade

    **Emergence**: first snapshot where the relative norm reaches the threshold (0.5 by default).
    **Fade**: the snapshot after the peak from which the feature stays below it to the end (none when
    the feature is still present in the final snapshot). Counts per snapshot:
    """),
    code("""
    counts = pd.DataFrame({
        "emerging": alive["emergence_step"].value_counts(),
        "peaking": alive["peak_step"].value_counts(),
        "fading": alive["fade_step"].value_counts(),
    }).reindex(run.steps).fillna(0).astype(int)
    counts.index.name = "step"
    counts.T
    """),
    md("""
    ## Shape groups

    Two questions about each profile, did it emerge early and is it still present at the end, give the
    groups below; each panel shows a few examples and the group's median profile.
    """),
    code("""
    from evolution.timelines import GROUPS

    pd.DataFrame({"meaning": GROUPS, "features": f["group"].value_counts()}).fillna(0)
    """),
    code("""
    run.plot_timelines_by_group()
    """),
    md("""
    ## Directions: cosine to the final snapshot, and the turning point

    `cos_to_final[i, s]` compares the feature's direction in snapshot `s` with its final one. The
    **turning point** is the snapshot interval where alive features change direction most, each change
    weighted by how present the feature is on both sides (`evolution/timelines.py`); Ge et al. 2025 see
    most Pythia features turn around step ~1000.
    """),
    code("""
    s = run.summary
    print(f"turning point: step {run.turning_point_step} (interval {s.get('turning_interval')}); "
          f"{s.get('turn_agreement', float('nan')):.0%} of turning features turn within one snapshot of it")
    run.plot_cos_to_final()
    """),
    code("""
    turn = run.timelines.turn[~run.timelines.dead].mean(0)
    fig = Figure(figsize=(7, 3), layout="constrained")
    ax = fig.add_subplot()
    labels = [f"{a}→{b}" for a, b in zip(run.steps[:-1], run.steps[1:])]
    ax.bar(range(len(labels)), turn.numpy(), color=["C3" if k + 1 == run.timelines.turning_index else "C0"
                                                    for k in range(len(labels))])
    ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    ax.set_ylabel("mean weighted direction change")
    ax.set_title("direction change per snapshot interval (red: the turning point)")
    fig
    """),
    md("""
    ## Pairwise cosines of one feature

    For one feature, the cosine between its decoder directions in every pair of snapshots: a block
    structure shows when its direction settled. This needs the crosscoder's weights (`run.crosscoder`).
    """),
    code("""
    i = int(alive.sort_values("max_norm", ascending=False)["feature"].iloc[0])
    C = run.pairwise_cos([i])[0]
    assert torch.allclose(C.diagonal(), torch.ones(len(run.steps)), atol=1e-4)
    fig = Figure(figsize=(5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(C.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(run.steps)), run.steps, rotation=90, fontsize=7)
    ax.set_yticks(range(len(run.steps)), run.steps, fontsize=7)
    ax.set_title(f"feature {i}: cos(W_dec[s], W_dec[t])")
    fig.colorbar(im, ax=ax)
    fig
    """),
    md("""
    ## Feature types

    On the planted corpus every token is produced by one known mechanism (unigram, bigram, copy, topic),
    so each feature gets a ground-truth type `gt_type`: the mechanism of the next token where it fires.
    On other corpora the type is the largest of the probe scores (previous-token, induction, context).
    Ge et al. 2025 find previous-token features form first, induction features later.
    """),
    code("""
    from evolution.plots import feature_types

    types = feature_types(f)
    if types is None:
        print("no type columns in features.csv: run `feature-evolution analyze` with probes")
    else:
        by_type = (alive.assign(type=types[alive.index])
                   .groupby("type")
                   .agg(features=("feature", "size"), median_peak_step=("peak_step", "median"),
                        median_emergence_step=("emergence_step", "median")))
        display(by_type.sort_values("median_peak_step"))
    """),
    code("""
    run.plot_timelines_by_type()
    """),
    md("""
    ## Top contexts of one feature

    The probes keep, per feature and probed snapshot, the contexts where it fires most (the feature
    browser shows the same). Here: the strongest feature that fired on the probe text.
    """),
    code(_SHOW_CONTEXTS, '''
    with_ctx = [int(k) for k, by_step in run.contexts.items() if any(by_step.values())]
    if with_ctx:
        j = int(alive[alive["feature"].isin(with_ctx)].sort_values("max_norm")["feature"].iloc[-1])
        row = run.feature(j)
        print(f"feature {j}: peak step {row['peak_step']}, group {row['group']}, type {row.get('gt_type')}")
        show_contexts(row["contexts"])
    else:
        print("no top contexts in this run (the probes did not run, or no feature fired on the probe text)")
    '''),
]

PHASE_MAP: list[Cell] = [
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
    from evolution.lossplot import learned_steps, loss_figure

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
    from evolution.geometry import geometry_heatmap

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
    from evolution.phases import PhasesConfig, combine, phase_map, phase_signals, read_run

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

PYTHIA: list[Cell] = [
    md("""
    # A crosscoder across real Pythia checkpoints (GPU)

    Pythia (Biderman et al. 2023) publishes 154 checkpoints of each model on the Hugging Face hub
    (revisions `step0` … `step143000`). Here: load a subset of Pythia-70M's checkpoints through
    transformer-lens, harvest one hook's activations on Pile text in every snapshot, train a BatchTopK
    crosscoder across them, and read off when each feature forms. With a GPU (`device="cuda"`) the
    defaults take tens of minutes; on a CPU, lower `FE_N_SEQS`, `FE_D_SAE` and `FE_TRAIN_STEPS`.
    Disk: the activation store is about `FE_N_SEQS × seq_len × n_snapshots × 512 × 2` bytes (≈6 GB).
    The Pile's shards are `.jsonl.zst`: streaming them needs `pip install zstandard`.

    For the full study as cached stages, use the recipe instead: `feature-evolution run runs/pythia-70m.toml`
    (and `runs/pythia-160m-ge2025.toml` for Ge et al. 2025's 32 snapshots of Pythia-160M).
    """),
    code(f"""
    %matplotlib inline
    import os
    from pathlib import Path

    import torch

    from evolution.snapshots import GE2025_STEPS

    # Inputs: environment variables with defaults for real use. The tests serve a tiny GPT-NeoX laid out
    # like the hub's cache (HF_HUB_OFFLINE=1, HF_HUB_CACHE), under the same model name.
    {_REPO}
    MODEL = os.environ.get("FE_MODEL", "EleutherAI/pythia-70m")
    STEPS = ([int(s) for s in os.environ["FE_STEPS"].split(",")] if "FE_STEPS" in os.environ
             else sorted(set(GE2025_STEPS[::3]) | {{GE2025_STEPS[-1]}}))  # 12 of Ge et al.'s 32 steps
    HOOK = os.environ.get("FE_HOOK", "blocks.3.hook_resid_post")  # middle of Pythia-70M's 6 blocks
    CORPUS = os.environ.get("FE_CORPUS", "hf:monology/pile-uncopyrighted")  # the Pile, as Pythia saw it
    MAX_CHARS = int(os.environ.get("FE_MAX_CHARS", "8000000"))  # text read from a streamed dataset
    SEQ_LEN = int(os.environ.get("FE_SEQ_LEN", "128"))
    N_SEQS = int(os.environ.get("FE_N_SEQS", "4096"))  # training rows: ≈ 520k tokens
    N_EVAL = int(os.environ.get("FE_N_EVAL", "64"))  # held-out rows: loss, FVU, probes
    D_SAE = int(os.environ.get("FE_D_SAE", "4096"))  # 8 × d_model
    K = float(os.environ.get("FE_K", "32"))  # BatchTopK: active latents per token
    TRAIN_STEPS = int(os.environ.get("FE_TRAIN_STEPS", "4000"))
    BATCH = int(os.environ.get("FE_BATCH", "4096"))
    OUT = Path(os.environ.get("FE_OUT", REPO / "runs" / "pythia-70m-notebook"))
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{{MODEL}} at steps {{STEPS}}, hook {{HOOK}}, device {{DEVICE}}, output {{OUT}}")
    """),
    md("""
    ## Text, tokenized with the model's own tokenizer

    Offline, fail now with a message rather than deep inside a download.
    """),
    code("""
    from evolution.corpus import CorpusConfig, build_corpus
    from evolution.hub import require_hub

    require_hub(f"this notebook ({MODEL} checkpoints)", [MODEL])
    corpus = build_corpus(CorpusConfig(source=CORPUS, tokenizer=MODEL, seq_len=SEQ_LEN, n_train_seqs=N_SEQS,
                                       n_eval_seqs=N_EVAL, streaming=CORPUS.startswith("hf:"), max_chars=MAX_CHARS))
    print(f"train {tuple(corpus.tokens.shape)}, eval {tuple(corpus.eval_tokens.shape)}, BOS id {corpus.bos_token_id}")
    print(repr(corpus.tokenizer.decode(corpus.tokens[0, :40])))
    """),
    md("""
    ## A first look at the checkpoints

    `iter_snapshots("hf:<model>", steps)` yields `(step, HookedTransformer)` one model at a time (each
    checkpoint is downloaded once, then served from the hub cache). For each: the held-out loss, and the
    held-out activations at the hook, kept to evaluate the crosscoder later.
    """),
    code("""
    from crosscoders.harvest import keep_mask, model_acts
    from evolution.references import bigram_entropy, unigram_entropy
    from evolution.snapshots import iter_snapshots

    eval_tokens = corpus.eval_tokens
    keep = keep_mask(eval_tokens, bos_token_id=corpus.bos_token_id)
    losses, eval_acts = {}, []
    for step, model in iter_snapshots(f"hf:{MODEL}", STEPS, device=DEVICE):
        with torch.no_grad():
            batch_losses = [model(t.to(DEVICE), return_type="loss").item() for t in eval_tokens.split(16)]
        losses[step] = sum(batch_losses) / len(batch_losses)
        eval_acts.append(model_acts(model, eval_tokens, [HOOK], batch_size=16)[HOOK][keep].to(torch.bfloat16))
        del model
    eval_acts = torch.stack(eval_acts, dim=1)  # [tokens, n_snapshots, d_model]
    refs = {"unigram entropy": unigram_entropy(corpus.tokens, corpus.bos_token_id),
            "bigram entropy": bigram_entropy(corpus.tokens, corpus.bos_token_id)}
    losses
    """),
    code("""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(list(losses), list(losses.values()), "ko-", ms=4, label="held-out loss")
    for (name, v), ls in zip(refs.items(), ("--", ":")):
        ax.axhline(v, color="C3", ls=ls, label=f"{name} (plug-in, this sample) {v:.2f}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(losses) * 1.1)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("nats / token")
    ax.legend(fontsize=8)
    fig
    """),
    md("""
    ## Harvest

    The training rows run through every snapshot into an on-disk activation store
    `[tokens, n_snapshots, d_model]` (bf16 shards with checksums, resumable). The loaders are lazy,
    so one model is in memory at a time. (`crosscoders.harvest.stream` feeds training straight from
    models held in memory instead, with no disk.)
    """),
    code("""
    from functools import partial

    from crosscoders.harvest import harvest
    from evolution.snapshots import load_pythia_snapshot

    store = harvest([partial(load_pythia_snapshot, MODEL, s, DEVICE) for s in STEPS], corpus.tokens, HOOK,
                    OUT / "activations" / HOOK, sources=[f"step{s}" for s in STEPS], batch_size=32,
                    bos_token_id=corpus.bos_token_id, dtype="bfloat16")
    print(store)
    """),
    md("""
    ## Train the crosscoder

    One shared code across snapshots, `f = BatchTopK(Σ_s W_enc[s] x_s + b_enc)`, and one decoder per
    snapshot (Lindsey et al. 2024). BatchTopK rather than an L1 penalty: L1 shrinks and decouples
    latents across sources (Minder et al. 2025). Training resumes from `OUT/crosscoder/checkpoint/`.
    """),
    code("""
    import pandas as pd

    from crosscoders.config import CrosscoderConfig, TrainConfig
    from crosscoders.train import evaluate, train

    tcfg = TrainConfig(crosscoder=CrosscoderConfig(d_sae=D_SAE, activation="batchtopk", k=K), steps=TRAIN_STEPS,
                       batch_size=BATCH, lr=2e-4, device=DEVICE, autocast="bf16" if DEVICE == "cuda" else "none",
                       checkpoint_every=500, log_every=max(1, TRAIN_STEPS // 100))
    crosscoder = train(tcfg, lambda start: store.batches(BATCH, seed=0, normalize=True, start_batch=start),
                       OUT / "crosscoder", norm_scale=store.scales)
    crosscoder = crosscoder.to(DEVICE)  # the saved model has the normalisation folded in: it reads raw activations
    ev = evaluate(crosscoder, eval_acts.float().split(4096))
    quality = pd.DataFrame({"step": STEPS, "fvu": ev["fvu"], "l0_own_encoder": ev["l0_per_source"]}).set_index("step")
    print(f"held-out FVU (mean over snapshots) {ev['fvu_mean']:.3f}, L0 of the shared code {ev['l0']:.1f}, "
          f"dead {ev['dead_frac']:.1%}")
    quality.T
    """),
    md("""
    ## Feature timelines

    Decoder norm per feature and snapshot, peak steps, and direction changes (see `02_feature_timelines`).
    On Pythia, Ge et al. 2025 see most features turn direction around step ~1000.
    """),
    code("""
    from evolution import plots
    from evolution.timelines import compute_timelines

    tl = compute_timelines(crosscoder, STEPS)
    s = tl.summary()
    print(f"{s['n_alive']} alive features; median peak step {s['median_peak_step']}; "
          f"turning point: step {s['turning_point_step']}; groups {s['group_counts']}")
    plots.plot_heatmap(tl)
    """),
    code("""
    plots.plot_peak_steps(tl)
    """),
    code("""
    plots.plot_cos_to_final(tl)
    """),
    md("""
    ## What the features are

    Probe a few snapshots: previous-token, induction and context-dependence scores per feature, and its
    top contexts (`evolution/probes.py`). Ge et al. 2025: previous-token features form first (~1k–5k
    steps), induction features later (~10k–100k), context-dependent ones late.
    """),
    code("""
    from evolution.probes import ProbeConfig, probe_features

    probe_steps = sorted({STEPS[0], STEPS[len(STEPS) // 2], STEPS[-1]})
    probes = probe_features(crosscoder, iter_snapshots(f"hf:{MODEL}", probe_steps, device=DEVICE), corpus.eval_tokens,
                            HOOK, steps=STEPS, cfg=ProbeConfig(max_seqs=N_EVAL), tokenizer=corpus.tokenizer,
                            bos_token_id=corpus.bos_token_id)
    features = tl.to_frame().merge(probes.table, on="feature")
    alive = features[~features["dead"]]
    # type = the largest probe score when above 0.2 (a feature that never fired on the probe text has none)
    scores = features[list(plots.TYPE_SCORE_COLUMNS)].fillna(-1.0)
    types = scores.idxmax(axis=1).str.removesuffix("_score").where(scores.max(axis=1) > 0.2)
    (alive.assign(type=types[alive.index]).groupby("type", dropna=False)
          .agg(features=("feature", "size"), median_peak_step=("peak_step", "median")))
    """),
    code(_SHOW_CONTEXTS, '''
    j = int(alive.sort_values("induction_score", ascending=False)["feature"].iloc[0])
    print(f"feature {j} (highest induction score, peak step {features.loc[j, 'peak_step']}):")
    show_contexts(probes.contexts.get(str(j), {}))
    '''),
    md("""
    ## Save it as a run directory

    Written the way `feature-evolution analyze` writes it, the result opens with the notebook API of
    `02_feature_timelines` (`evolution.load_run`).
    """),
    code("""
    import evolution
    from crosscoders.io import write_json

    tl.save(OUT / "analysis" / "timelines.safetensors")
    features.to_csv(OUT / "analysis" / "features.csv", index=False)
    write_json(OUT / "analysis" / "summary.json", s)
    probes.save(OUT / "analysis")
    run = evolution.load_run(OUT)
    print(run)
    run.plot_timelines_by_group()
    """),
]

NOTEBOOKS: dict[str, list[Cell]] = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_feature_timelines.ipynb": TIMELINES,
    "03_phase_map.ipynb": PHASE_MAP,
    "04_pythia_gpu.ipynb": PYTHIA,
}


def build(cells: list[Cell]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, src) in enumerate(cells):
        cell = nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives byte-identical files
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(cells: list[Cell]) -> str:
    return nbformat.writes(build(cells)) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / name
        text = render(cells)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date with notebooks/build.py: {', '.join(stale)}; run `python notebooks/build.py`")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
