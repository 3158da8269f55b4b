"""Cells of notebooks/02_feature_timelines.ipynb."""

from cells.common import _REPO, _SHOW_CONTEXTS, Cell, code, md

CELLS: list[Cell] = [
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
    from evolution.features.timelines import GROUPS

    pd.DataFrame({"meaning": GROUPS, "features": f["group"].value_counts()}).fillna(0)
    """),
    code("""
    run.plot_timelines_by_group()
    """),
    md("""
    ## Directions: cosine to the final snapshot, and the turning point

    `cos_to_final[i, s]` compares the feature's direction in snapshot `s` with its final one. The
    **turning point** is the snapshot interval where alive features change direction most, each change
    weighted by how present the feature is on both sides (`evolution/features/timelines`); Ge et al. 2025 see
    most Pythia features turn around step ~1000.
    """),
    code("""
    s = run.summary
    print(f"turning point: {run.turning_verdict}; "
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
    from evolution.features.plots import feature_types

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
    ## The learning hierarchy, by planted mechanism

    `run.hierarchy(by="mechanism")`: per planted mechanism, how many features it drives (`n`, and
    `n_from_start` present from the first snapshot, left out: no rising edge was observed), the median, IQR
    and bootstrap CI of their emergence step, the step the model learned that mechanism (its eval loss
    below every reference that cannot explain it, `pretrain/learned_steps.json`) and its learning onset
    (the loss has fallen 10% of the way, `pretrain/learning_onsets.json`). `matched` / `matched_onset`: the
    median lies within one snapshot interval of it. `at="peak"` reads the peak snapshot instead. On a run
    too small for any mechanism's features the table is empty.
    """),
    code("""
    cols = ["group", "n", "n_from_start", "median_step", "ci_lo_step", "ci_hi_step", "onset_step", "learned_step",
            "matched_onset", "matched"]
    for at in ("emergence", "peak"):
        h = run.hierarchy(by="mechanism", at=at)
        display(h.reindex(columns=cols) if len(h) else h)
    """),
    md("""
    ## Latent Scaling: does the decoder norm under-read a feature?

    `run.latent_scaling()` (Minder et al. 2025): for every latent and snapshot, the least-squares scale β with
    which the latent's decoder direction explains that snapshot's held-out activations, beside its decoder
    norm. A latent is *flagged* in a snapshot where the norm says "absent" (< 0.2 × its peak norm) but β says
    "present" (≥ 0.5 × the peak norm). `ls_onset_step` is the first snapshot where β reaches half its maximum.
    """),
    code("""
    try:
        ls = run.latent_scaling()
        flagged = ls["flagged"]
        print(f"{int(flagged.any(1).sum())} of {flagged.shape[0]} latents flagged in at least one snapshot "
              f"({int(flagged.sum())} latent-snapshot pairs)")
        display(alive[["feature", "emergence_step", "ls_onset_step", "ls_flagged"]].sort_values("ls_flagged").tail())
    except FileNotFoundError as e:
        print(e)
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
