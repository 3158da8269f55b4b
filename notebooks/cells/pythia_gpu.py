"""Cells of notebooks/04_pythia_gpu.ipynb."""

from cells.common import _REPO, _SHOW_CONTEXTS, Cell, code, md

CELLS: list[Cell] = [
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

    from evolution.sources.snapshots import GE2025_STEPS

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
    from evolution.sources.corpus import CorpusConfig, build_corpus
    from evolution.sources.hub import require_hub

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
    from evolution.sources.references import bigram_entropy, unigram_entropy
    from evolution.sources.snapshots import iter_snapshots

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
    from evolution.sources.snapshots import load_pythia_snapshot

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
    from crosscoders.evaluation import evaluate
    from crosscoders.train import train

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
    from evolution.features import plots
    from evolution.features.timelines import compute_timelines

    tl = compute_timelines(crosscoder, STEPS)
    s = tl.summary()
    print(f"{s['n_alive']} alive features; median peak step {s['median_peak_step']}; "
          f"turning point: {s['turning_point_verdict']}; groups {s['group_counts']}")
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

    Probe a few snapshots: the raw statistics per feature (R² of the current and previous token, the
    induction contrast on repeated random tokens) and its top contexts (`evolution/features/probes`); the
    feature *types*, scored against shuffled nulls, come with the run directory below (`type_score_*`). Ge et al. 2025: previous-token features form first (~1k–5k
    steps), induction features later (~10k–100k), context-dependent ones late.
    """),
    code("""
    from evolution.features.probes import ProbeConfig, probe_features

    probe_steps = sorted({STEPS[0], STEPS[len(STEPS) // 2], STEPS[-1]})
    probes = probe_features(crosscoder, iter_snapshots(f"hf:{MODEL}", STEPS, device=DEVICE), corpus.eval_tokens,
                            HOOK, steps=STEPS, cfg=ProbeConfig(max_seqs=N_EVAL), tokenizer=corpus.tokenizer,
                            bos_token_id=corpus.bos_token_id, probe_steps=probe_steps)
    features = tl.to_frame().merge(probes.table, on="feature")
    alive = features[~features["dead"]]
    alive[["feature", "peak_step", "r2_current", "r2_previous", "induction_contrast"]].describe()
    """),
    code(_SHOW_CONTEXTS, '''
    j = int(alive.sort_values("induction_contrast", ascending=False)["feature"].iloc[0])
    print(f"feature {j} (highest induction contrast, peak step {features.loc[j, 'peak_step']}):")
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
