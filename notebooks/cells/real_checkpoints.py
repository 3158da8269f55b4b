"""Cells of notebooks/05_real_checkpoints.ipynb."""

from cells.common import _REPO, Cell, code, md

CELLS: list[Cell] = [
    md("""
    # The whole study on your own checkpoints

    Point the suite at a directory of training checkpoints laid out like Pythia's hub revisions
    (`step0/`, `step1000/`, … each a Hugging Face directory: config.json, weights, tokenizer files), or at
    a hub repo (`hf:EleutherAI/pythia-70m`). Every stage (harvest, crosscoder, probes, geometry, per-snapshot
    evaluation, phase map, report) gets its models from one snapshot source, one model in memory at a time,
    and the corpus is tokenized with **the checkpoints' own tokenizer**. Families: GPT-NeoX (Pythia),
    GPT-2 and Llama-style directories, through transformer-lens.

    The same run as a recipe: `[snapshots] source = "local:<dir>"` in a `runs/*.toml`, then
    `feature-evolution run runs/<name>.toml`.
    """),
    code(f"""
    %matplotlib inline
    import json
    import os
    from pathlib import Path

    {_REPO}
    SOURCE = os.environ.get("FE_SOURCE", "hf:EleutherAI/pythia-70m")  # or "local:/path/to/checkpoints"
    STEPS = [int(s) for s in os.environ["FE_STEPS"].split(",")] if "FE_STEPS" in os.environ else None
    TEXT = os.environ.get("FE_TEXT", "shakespeare")  # a .txt/.jsonl/.jsonl.zst file, "hf:<dataset>", "shakespeare"
    HOOK = os.environ.get("FE_HOOK", "blocks.3.hook_resid_post")
    SEQ_LEN = int(os.environ.get("FE_SEQ_LEN", "128"))
    N_SEQS = int(os.environ.get("FE_N_SEQS", "2048"))
    D_SAE = int(os.environ.get("FE_D_SAE", "4096"))
    TRAIN_STEPS = int(os.environ.get("FE_TRAIN_STEPS", "2000"))
    OUT = Path(os.environ.get("FE_OUT", REPO / "runs"))
    """),
    md("""
    ## Do the checkpoints agree? (config and tokenizer files only, no weights)

    A crosscoder spans snapshots of one model: same family, width, depth, vocabulary and tokenizer. The
    check reads config.json and the tokenizer files of every step before any model runs, and stops with
    both sides named when two disagree.
    """),
    code("""
    import pandas as pd

    from evolution.api import snapshots

    src = snapshots(SOURCE, STEPS)
    common = src.check()
    print(f"{len(src.steps)} snapshots of {SOURCE}: {common.describe()}")
    pd.DataFrame([{"step": s, **vars(src.identity(s))} for s in src.steps]).set_index("step")
    """),
    md("""
    ## The study, tokenized with the checkpoints' tokenizer

    The corpus stage tokenizes the text with the snapshots' tokenizer and records its hash (also in the
    activation store's manifest); the evaluate stage runs every snapshot on the held-out rows, so the
    loss panel and the KL-to-n-gram signals come from the checkpoints themselves.
    """),
    code("""
    from crosscoders.dataclass_cli import from_dict
    from evolution.pipeline import run_study
    from evolution.recipe import RunConfig

    cfg = from_dict(RunConfig, {
        "name": "real-checkpoints", "root": str(OUT),
        "corpus": {"source": TEXT, "seq_len": SEQ_LEN, "n_train_seqs": 0, "n_eval_seqs": 16, "max_chars": 2_000_000},
        "snapshots": {"source": SOURCE, "steps": src.steps},
        "harvest": {"hook": HOOK, "n_seqs": N_SEQS, "n_eval_seqs": 8, "batch_size": 8},
        "train": {"steps": TRAIN_STEPS, "batch_size": 128, "lr": 1e-3, "progress": False,
                  "crosscoder": {"d_sae": D_SAE, "activation": "batchtopk", "k": 4}},
        "analyze": {"probe_snapshots": 2, "probe_max_seqs": 16}, "geometry": {"n_tokens": 256, "n_resamples": 4}})
    records = run_study(cfg)
    run = cfg.run_dir
    meta = json.loads((run / "corpus" / "meta.json").read_text())
    print(f"corpus: {meta['n_train_seqs']} rows from {meta['text_source']}, tokenizer {meta['tokenizer_hash']} "
          f"from {meta['tokenizer_from']}")
    pd.DataFrame([{"stage": k, "seconds": v["seconds"]} for k, v in records.items()]).set_index("stage")
    """),
    md("""
    ## What the snapshots show

    The held-out loss of each checkpoint against the add-α unigram and bigram references, the layer
    geometry per snapshot, and the phase map (which signals place the statistical/feature boundary).
    """),
    code("""
    from IPython.display import Image, display

    for fig in ("loss.png", "geometry_id_twonn.png", "phase_map.png"):
        display(Image(filename=str(run / "figures" / fig)))
    phases = json.loads((run / "phases.json").read_text())
    print("verdict:", phases.get("verdict"), "| signals:", {k: v.get("step") for k, v in phases["signals"].items()})
    """),
]
