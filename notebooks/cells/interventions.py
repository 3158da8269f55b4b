"""Cells of notebooks/07_interventions.ipynb."""

from cells.common import _REPO, Cell, code, md

CELLS: list[Cell] = [
    md("""
    # Linearity as an intervention

    The geometry stage measures how *linear* each block's map from its input to its output residual is
    (Razzhigaev et al. 2024). Here the measurement becomes an intervention: every block of every snapshot
    is replaced by its least-squares affine map (fitted on training tokens) or removed, and the held-out
    loss change Δloss is measured with a bootstrap CI. Do the most linear blocks cost least? From which
    step on can a block no longer be replaced? The logit lens shows how early each layer's residual
    already predicts the model's output, and the logit effects show what a crosscoder feature writes
    to the vocabulary in each snapshot.
    """),
    code(f"""
    %matplotlib inline
    import os
    from pathlib import Path

    import pandas as pd

    import evolution

    {_REPO}
    RUN = Path(os.environ.get("FE_RUN", REPO / "runs" / "demo"))
    N_EVAL_SEQS = int(os.environ.get("FE_N_EVAL_SEQS", "128"))
    """),
    md("""
    ## Run the stage (once)

    `feature-evolution interventions --n-eval-seqs N RUN` (or `[interventions] enabled = true` in the
    recipe) writes `interventions.json`, its figures, `spikes.json` and `analysis/logit_effects.json`;
    it resumes per snapshot. On the demo it takes about 2 CPU-minutes.
    """),
    code("""
    from evolution.cli import main

    if not (RUN / "interventions.json").exists():
        main(["interventions", "--n-eval-seqs", str(N_EVAL_SEQS), str(RUN)])
    run = evolution.load_run(RUN)
    iv = run.interventions
    last = str(iv["steps"][-1])
    """),
    md("""
    ## Δloss against linearity, last snapshot

    `linearity` is the geometry stage's score on the held-out tokens, `r2_heldout` the held-out R² of the
    fitted map; `linear` / `identity` are Δloss (nats/token) of replacing the block by the map or
    removing it.
    """),
    code("""
    rows = []
    for b in iv["snapshots"][last]["blocks"]:
        rows.append({"block": b["block"], "linearity": b["linearity"], "r2_heldout": b["r2_heldout"],
                     "Δloss linear": b["linear"]["delta"], "CI linear": b["linear"]["ci"],
                     "Δloss removed": b["identity"]["delta"], "CI removed": b["identity"]["ci"]})
    table = pd.DataFrame(rows).sort_values("linearity", ascending=False)
    print("most linear block first; does it cost least?",
          table["Δloss linear"].is_monotonic_increasing)
    table
    """),
    code("""
    from evolution.interventions.plots import plot_delta_vs_step, plot_logit_lens, plot_pruning

    print("not replaceable within", iv["tolerance"], "nats from step:", iv["replaceable_until"])
    plot_delta_vs_step(iv)
    """),
    code("""
    plot_pruning(iv)
    """),
    md("""
    ## Logit lens, layer × step

    Each layer's residual read through the final norm and the unembedding: its loss and how often its
    top token is the model's own (the last layer is the model: agreement 1).
    """),
    code("""
    plot_logit_lens(iv)
    """),
    md("""
    ## What a feature writes, snapshot by snapshot

    The tokens feature i's decoder direction promotes and suppresses through each snapshot's final norm
    and W_U: watch its meaning settle.
    """),
    code("""
    i = int(run.features["max_norm"].idxmax()) if "max_norm" in run.features else 0
    for step in run.steps[:: max(1, len(run.steps) // 4)] + [run.steps[-1]]:
        e = run.logit_effects(i, step)
        print(f"feature {i}, step {step:>5}: promotes", [t for t, _ in e["promoted"]],
              "suppresses", [t for t, _ in e["suppressed"]])
    """),
    md("""
    ## Loss spikes and intrinsic dimension

    Spikes of the pre-training loss by the rule of `evolution/interventions/spikes.py`, with the ID per
    layer in the snapshots just before and after each (The Shape of Learning: ID rises before spikes).
    """),
    code("""
    import json

    spikes = json.loads((RUN / "spikes.json").read_text()) if (RUN / "spikes.json").exists() else {}
    print(f"{len(spikes.get('spikes', []))} spikes in {spikes.get('n_steps', 0)} steps (rule: {spikes.get('rule')})")
    pd.DataFrame(spikes.get("spikes", []))
    """),
]
