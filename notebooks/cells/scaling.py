"""Cells of notebooks/08_scaling.ipynb."""

from cells.common import _REPO, Cell, code, md

CELLS: list[Cell] = [
    md("""
    # Scaling up: the cost plan, zero-disk streaming, torch.distributed

    Ge et al. 2025 trained their Pythia-160M crosscoder (32 snapshots × 768 × 24,576 latents) from a
    multi-terabyte activation cache on 8 GPUs. Here the same study runs (1) from a plan that says what it
    costs before anything runs, (2) with `[harvest] mode = "stream"`: no activation store, the snapshots
    compute each shuffle window as training consumes it, and (3) on `torchrun` ranks that split the batch
    (data parallel) and the snapshots (source parallel). See `docs/scaling.md`.
    """),
    code(f"""
    %matplotlib inline
    import os
    from pathlib import Path

    # Inputs: environment variables with defaults for real use (the tests point them at a tiny run).
    {_REPO}
    RECIPE = Path(os.environ.get("FE_RECIPE", REPO / "runs" / "pythia-160m-ge2025-stream.toml"))
    RUN = Path(os.environ.get("FE_RUN", REPO / "runs" / "demo"))  # a run with snapshots/ and corpus/
    TRAIN_STEPS = int(os.environ.get("FE_TRAIN_STEPS", "300"))
    print(f"plan of {{RECIPE.name}}; streaming from the snapshots of {{RUN}}")
    """),
    md("""
    ## The plan: what the recipe costs on 1 and 8 GPUs

    `feature-evolution plan RECIPE --gpus 1,8` prints the same figures. The FLOP, disk and memory
    figures are counts; the hours rest on the assumed rates printed below (no GPU benchmark has been
    recorded yet; `evolution/plan.py` says how to replace them with measured ones).
    """),
    code("""
    import pandas as pd

    from evolution.recipe import load_recipe
    from evolution.plan import ASSUMPTIONS, plan

    cfg = load_recipe(RECIPE)
    plans = [plan(cfg, n, "H100") for n in (1, 8)]
    table = pd.DataFrame({f"{p['gpus']} x H100 (data {p['layout']['data']} x source {p['layout']['source']})": {
        "activation disk (GB)": p["activation_disk_GB"]["this_recipe"],
        "store-mode disk (GB)": p["activation_disk_GB"]["store"],
        "forward PFLOP": p["forward_PFLOP"], "crosscoder PFLOP": p["crosscoder_PFLOP"],
        "memory per rank (GiB)": p["memory_per_rank_GiB"]["total_GiB"], "hours": p["hours"]["total"]} for p in plans})
    print("assumed rates:", ASSUMPTIONS)
    table
    """),
    code("""
    import matplotlib.pyplot as plt

    parts = [k for k in plans[0]["hours"] if k != "total"]
    fig, ax = plt.subplots(figsize=(7, 3))
    for i, p in enumerate(plans):
        left = 0.0
        for j, k in enumerate(parts):
            ax.barh(i, p["hours"][k], left=left, color=f"C{j}", label=k if i == 0 else None)
            left += p["hours"][k]
    ax.set_yticks(range(len(plans)), [f"{p['gpus']} GPU(s)" for p in plans])
    ax.set_xlabel("hours (assumed rates)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(cfg.name)
    fig.tight_layout()
    """),
    md("""
    ## Memory per stage, and what the full study needs

    `evolution.memory.stage_memory` predicts each model-running stage's peak memory on its device (the tensors the
    loss saves are counted by running it, not assumed); `run_study` refuses a stage that cannot fit before any
    model loads. `benchmarks/dryrun.py` measures the same at Pythia-160M's width on a CPU
    (`runs/pythia-160m-dryrun.toml`). `plan(..., --full-study)` plans Ge et al.'s full study (32 snapshots ×
    800M tokens, no activation disk) after each change that stands between today's code and one GPU in 6 hours.
    """),
    code("""
    from evolution.memory import stage_memory
    from evolution.plan import format_full_study, full_study

    print({stage: f"{b / 2**30:.1f} GiB" for stage, b in stage_memory(cfg).items()})
    print(format_full_study(full_study(cfg, "H100", 1), "H100", 1))
    """),
    md("""
    ## Streaming from Python

    `ShuffleStream` runs windows of `buffer_seqs` sequences through every snapshot, shuffles the window's
    tokens and yields batches without replacement. Where each step's batch comes from is a function of
    the step (`position`), so `train` records it in its checkpoint and a killed run resumes exactly.
    """),
    code("""
    import dataclasses
    import json
    import tempfile

    import torch

    from crosscoders.config import CrosscoderConfig, TrainConfig
    from crosscoders.dataclass_cli import from_dict
    from crosscoders.stream import ShuffleStream, measure_stream_scales
    from crosscoders.evaluation import evaluate
    from crosscoders.train import train
    from evolution.context import RunContext
    from evolution.recipe import load_run_config

    ctx = RunContext(load_run_config(RUN))  # the run's snapshot source and corpus, as every stage gets them
    run_cfg, steps, corpus = ctx.cfg, ctx.steps, ctx.corpus
    hook, tokens = run_cfg.harvest.hook, corpus.tokens
    buffer_seqs = max(2, min(64, len(tokens) // 4))
    scales, d_in = measure_stream_scales(ctx.loaders(), tokens, hook, buffer_seqs,
                                         bos_token_id=corpus.bos_token_id)
    batch = 64
    stream = ShuffleStream([load() for load in ctx.loaders()], tokens, hook, batch,
                           buffer_seqs=buffer_seqs, scales=scales, bos_token_id=corpus.bos_token_id)
    x = next(stream(0))
    print(f"{len(steps)} snapshots, d_in {d_in}; a batch: {list(x.shape)}; scales {[round(s, 3) for s in scales.tolist()]}")
    print("step 0 comes from", stream.position(0))
    print(f"step {TRAIN_STEPS} comes from", stream.position(TRAIN_STEPS))
    """),
    code("""
    tcfg = TrainConfig(steps=TRAIN_STEPS, batch_size=batch, lr=1e-3, progress=False,
                       crosscoder=CrosscoderConfig(n_sources=len(steps), d_in=d_in, d_sae=8 * d_in,
                                                   activation="batchtopk", k=8))
    with tempfile.TemporaryDirectory() as out:
        model = train(tcfg, stream, out, norm_scale=scales)
    held_out = ShuffleStream([load() for load in ctx.loaders()], corpus.eval_tokens, hook, batch,
                             buffer_seqs=max(1, min(16, len(corpus.eval_tokens))), bos_token_id=corpus.bos_token_id)
    ev = evaluate(model, held_out(0), max_batches=4)
    print(f"streamed crosscoder after {TRAIN_STEPS} steps: held-out FVU per snapshot "
          f"{[round(v, 3) for v in ev['fvu']]}, L0 {ev['l0']:.1f}")
    """),
    md("""
    ## On several GPUs

    Add to the recipe and run it as usual; the crosscoder stage starts `torchrun` itself:

    ```toml
    [parallel]
    nproc_per_node = 8      # one rank per GPU (NCCL); CPU processes use gloo
    source_parallel = 8     # 4 of the 32 snapshots per rank: memory per rank / 8
    ```

    `feature-evolution run runs/pythia-160m-ge2025-stream.toml`. On an activation store directly:
    `torchrun --nproc_per_node=8 -m crosscoders.train --store DIR --out DIR --source-parallel 4 ...`.
    With the same global batch the ranks end in one process's weights (tests/crosscoders/test_distributed.py,
    tests/evolution/crosscoder/test_crosscoder_stage.py).
    """),
]
