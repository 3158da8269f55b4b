"""The whole study as one resumable chain: corpus → pre-training → harvest → crosscoder → analysis →
geometry → phases → report. A recipe (`runs/*.toml`) is a `RunConfig`; each TOML table is one stage's
config, so every knob of every stage is reachable from the recipe and recorded in `run.json`.

Snapshots come from pre-training here (`snapshots.source = "pretrain"`), from a directory of
`step{N}` checkpoints (`"local:<dir>"`), or from Pythia on the hub (`"hf:EleutherAI/pythia-160m"`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from crosscoders.dataclass_cli import to_dict
from crosscoders.io import write_json
from evolution.recipe import HarvestConfig, RunConfig, SnapshotsConfig, load_recipe  # noqa: F401 (re-exported)
from evolution.stages import Stage, run_stages

# ------------------------------------------------------------------------------------------ stages


def _hub_name(cfg: RunConfig) -> str | None:
    src = cfg.snapshots.source
    return src.removeprefix("hf:") if src.startswith("hf:") else None


def snapshot_source(cfg: RunConfig, steps: list[int] | None = None, device: str | None = None):
    """The run's `SnapshotSource` (evolution.sources.snapshot_source): every stage gets its models from it."""
    from evolution.sources.snapshot_source import SnapshotSource

    s = cfg.snapshots
    return SnapshotSource(s.source, steps if steps is not None else s.steps, run_dir=cfg.run_dir,
                          device=device or cfg.harvest.device, cache_dir=s.cache_dir, local_files_only=s.local_files_only)


def snapshot_steps(cfg: RunConfig) -> list[int]:
    """The steps the run uses (a missing one is a SnapshotError listing those available)."""
    return snapshot_source(cfg).steps


def snapshot_root(cfg: RunConfig) -> Path:
    src = cfg.snapshots.source
    if src == "pretrain":
        return cfg.run_dir / "snapshots"
    if src.startswith("local:"):
        return Path(src.removeprefix("local:"))
    raise ValueError(f"snapshots.source {src!r} has no local root")


def _loaders(cfg: RunConfig, steps: list[int]):
    """One zero-argument loader per snapshot, so harvest keeps one model in memory at a time."""
    return snapshot_source(cfg, steps).loaders()


def build_corpus_stage(cfg: RunConfig) -> None:
    """The corpus; for local: and hf: snapshots tokenized with the snapshots' own tokenizer (unless [corpus]
    tokenizer names one) and checked against them before it is saved."""
    from evolution.sources.corpus import build_corpus

    if cfg.snapshots.source == "pretrain":
        build_corpus(cfg.corpus).save(cfg.run_dir)
        return
    src = snapshot_source(cfg)
    own = cfg.corpus.tokenizer is None and cfg.corpus.source != "planted"
    corpus = build_corpus(cfg.corpus, src.tokenizer() if own else None,
                          f"{src.source} ({src.location(src.steps[-1])})" if own else None)
    src.check_corpus(corpus)
    corpus.save(cfg.run_dir)


def pretrain_stage(cfg: RunConfig) -> None:
    from evolution.sources.corpus import Corpus
    from evolution.sources.pretrain import pretrain

    pretrain(cfg.pretrain, Corpus.load(cfg.run_dir / "corpus"), cfg.run_dir)
    loss_outputs(cfg.run_dir)


def loss_outputs(run: Path) -> None:
    """`figures/loss.png` and, on the planted corpus, the step each mechanism was learned at."""
    from crosscoders.io import read_jsonl
    from evolution.phases.loss import learned_steps, learning_onsets, save_loss_figure

    save_loss_figure(run)
    meta = json.loads((run / "corpus" / "meta.json").read_text())
    refs = meta.get("mechanism_references")
    if refs:
        log = read_jsonl(run / "pretrain" / "log.jsonl")
        write_json(run / "pretrain" / "learned_steps.json", learned_steps(log, refs))
        write_json(run / "pretrain" / "learning_onsets.json", learning_onsets(log))


def harvest_metadata(cfg: RunConfig, src, corpus) -> dict:
    """The store manifest's `metadata`: the token stream's and the snapshots' identity, after checking that
    the corpus fits the snapshots (before any model runs). One definition for every harvest path."""
    src.check_corpus(corpus)
    meta = json.loads((cfg.run_dir / "corpus" / "meta.json").read_text())
    stream = {k: meta.get(k) for k in ("tokenizer_hash", "tokenizer_from", "text_source", "vocab_size")}
    return {"token_stream": stream, "snapshots": src.describe()}


def harvest_stage(cfg: RunConfig) -> None:
    from crosscoders.harvest import harvest
    from evolution.sources.corpus import Corpus

    if cfg.harvest.mode == "stream":  # no store: the scales of the first window (evolution/scale.py)
        from evolution.scale import stream_harvest_stage

        return stream_harvest_stage(cfg)
    if cfg.parallel.nproc_per_node > 1:  # each torchrun rank harvests its snapshots into one store
        from evolution.scale import launch

        return launch(cfg, "harvest")
    run, h = cfg.run_dir, cfg.harvest
    corpus = Corpus.load(run / "corpus")
    src = snapshot_source(cfg)
    steps = src.steps
    if len(steps) < 2:
        raise ValueError(f"a crosscoder across snapshots needs ≥ 2 snapshots, found steps {steps}")
    sources = [f"step{s}" for s in steps]
    common = dict(hook=h.hook, sources=sources, batch_size=h.batch_size, dtype=h.dtype, autocast=h.autocast,
                  bos_token_id=corpus.bos_token_id, strategy="snapshot", metadata=harvest_metadata(cfg, src, corpus))
    harvest(src.loaders(), corpus.tokens[: h.n_seqs], out_dir=run / "activations" / h.hook, **common)
    eval_tokens = corpus.eval_tokens if corpus.eval_tokens is not None else corpus.tokens[-h.n_eval_seqs:]
    harvest(src.loaders(), eval_tokens[: h.n_eval_seqs], out_dir=run / "activations_eval" / h.hook, **common)


def crosscoder_stage(cfg: RunConfig) -> None:
    import torch

    from crosscoders.store import ActivationStore
    from crosscoders.train import check_epochs, evaluate, train

    run, h = cfg.run_dir, cfg.harvest
    if h.mode == "stream" or cfg.parallel.nproc_per_node > 1:  # zero-disk and/or torchrun ranks
        from evolution.scale import crosscoder_stage_scaled

        return crosscoder_stage_scaled(cfg)
    store = ActivationStore(run / "activations" / h.hook)
    store.verify()
    tcfg = cfg.train
    cc = dataclasses.replace(tcfg.crosscoder, n_sources=store.n_sources, d_in=int(store.manifest["d_in"]))
    tcfg = dataclasses.replace(tcfg, crosscoder=cc)
    check_epochs(tcfg, store.n_tokens)  # warns when the run would cycle the stored tokens many times
    out = run / "crosscoder"

    def batches(start: int):
        return store.batches(tcfg.batch_size, seed=tcfg.crosscoder.seed, normalize=True, start_batch=start)

    model = train(tcfg, batches, out, norm_scale=torch.as_tensor(store.scales, dtype=torch.float32))
    ev_store = ActivationStore(run / "activations_eval" / h.hook)
    ev_store.check_matches(model.cfg.n_sources, model.cfg.d_in)
    ev = evaluate(model, ev_store.batches(1024, seed=0, normalize=False, n_epochs=1))
    sources = store.manifest["sources"]
    # per-source numbers count crosscoders.model.activations_per_snapshot > 0 (one definition everywhere);
    # "l0_shared": latents active per token (in any source, per-source gate)
    result = {"sources": sources, "gate": model.cfg.gate, "fvu": ev["fvu"], "l0": ev["l0_per_source"],
              "dead_frac": ev["dead_frac_per_source"], "n_features_firing": ev["n_features_firing_per_source"],
              "l0_shared": ev["l0"], "dead_frac_shared": ev["dead_frac"],
              "fvu_mean": ev["fvu_mean"], "n_tokens": ev["n_tokens"]}
    write_json(out / "eval.json", result)
    from evolution.features.plots import quality_figure
    from evolution.figures import save_figure

    save_figure(quality_figure(result), out / "quality.png")


def evaluate_stage(cfg: RunConfig) -> None:
    """Each snapshot on the held-out tokens, through the same loaders as harvest (pretrain, local:, hf:)."""
    from evolution.phases.loss import save_loss_figure
    from evolution.phases.snapshot_eval import evaluate_snapshots
    from evolution.sources.corpus import Corpus

    src = snapshot_source(cfg)
    src.check_corpus(Corpus.load(cfg.run_dir / "corpus"))  # before any model runs
    evaluate_snapshots(cfg.run_dir, src.steps, src.loaders(), cfg.evaluate)
    # the loss panel: the pre-training log where there is one, else the snapshots' own held-out losses
    save_loss_figure(cfg.run_dir)


def numbers_on(cfg: RunConfig) -> bool:
    """The numbers stage runs when asked to, or (enabled unset) when the planted corpus has number tokens."""
    if cfg.numbers.enabled is not None:
        return cfg.numbers.enabled
    return cfg.corpus.source == "planted" and cfg.corpus.planted.p_number > 0


def numbers_stage(cfg: RunConfig) -> None:
    from evolution.numbers.stage import numbers

    steps = snapshot_steps(cfg)
    numbers(cfg.run_dir, cfg.numbers, steps, _loaders(cfg, steps))


def interventions_stage(cfg: RunConfig) -> None:
    """Linear replacement, pruning, logit lens and feature logit effects per snapshot, through the same
    loaders as harvest (pretrain, local:, hf:)."""
    from evolution.interventions.stage import interventions

    steps = snapshot_steps(cfg)
    interventions(cfg.run_dir, steps, _loaders(cfg, steps), cfg.interventions)


def _harvest_key(h: HarvestConfig) -> str:
    """What the harvest stage's key hashes: the config's repr, without the stream fields in store mode, so that
    runs harvested before `mode` existed keep their cached stages (stages.py hashes a dataclass in a dict by repr)."""
    if h.mode == "store":
        return str(h).replace(f", mode='store', stream_buffer_seqs={h.stream_buffer_seqs}, "
                              f"stream_shards={h.stream_shards})", ")")
    return str(h)


def _remover(*paths: Path):
    """A stage's `clean`: delete partial results written under an earlier config."""
    return lambda: [shutil.rmtree(p, ignore_errors=True) for p in paths]


def stages_for(cfg: RunConfig, force: tuple[str, ...] = ()) -> list[Stage]:
    from evolution.features.analyze import analyze
    from evolution.geometry.stage import geometry
    from evolution.phases.stage import phases
    from evolution.report.html import build_report

    run = cfg.run_dir
    snaps_in = ["pretrain"] if cfg.snapshots.source == "pretrain" else ["corpus"]
    # local:/hf: corpora are tokenized by the snapshots' tokenizer, so they depend on the snapshot source too
    corpus_key = cfg.corpus if cfg.snapshots.source == "pretrain" else {"corpus": cfg.corpus, "snapshots": cfg.snapshots}
    st = [Stage("corpus", lambda: build_corpus_stage(cfg), corpus_key, outputs=["corpus/tokens.safetensors"],
                describe=f"{run}/corpus/ (tokens, tokenizer, meta.json)")]
    if cfg.snapshots.source == "pretrain":
        from evolution.sources.pretrain import keyed_config

        st.append(Stage("pretrain", lambda: pretrain_stage(cfg), keyed_config(cfg.pretrain), inputs=["corpus"],
                        outputs=["pretrain/log.jsonl", "figures/loss.png"],
                        clean=_remover(run / "pretrain", run / "snapshots"),
                        describe=f"{run}/snapshots/step*/, {run}/pretrain/log.jsonl, {run}/figures/loss.png"))
    if numbers_on(cfg):
        st.append(Stage("numbers", lambda: numbers_stage(cfg), {"numbers": cfg.numbers, "snapshots": cfg.snapshots},
                        inputs=snaps_in, outputs=["numbers.json"],
                        describe=f"{run}/numbers.json, {run}/figures/numbers.png"))
    st += [
        Stage("harvest", lambda: harvest_stage(cfg), {"harvest": _harvest_key(cfg.harvest), "snapshots": cfg.snapshots},
              inputs=snaps_in, outputs=[f"activations/{cfg.harvest.hook}/manifest.json"],
              clean=_remover(run / "activations" / cfg.harvest.hook, run / "activations_eval" / cfg.harvest.hook),
              describe=f"{run}/activations/{cfg.harvest.hook}/ (shards + manifest.json)"),
        Stage("crosscoder", lambda: crosscoder_stage(cfg), cfg.train, inputs=["harvest"],
              outputs=["crosscoder/weights.safetensors", "crosscoder/eval.json"],
              clean=_remover(run / "crosscoder" / "checkpoint"),
              describe=f"{run}/crosscoder/ (cfg.json, weights.safetensors, train_log.jsonl, eval.json)"),
        Stage("analyze", lambda: analyze(run, cfg.analyze), cfg.analyze, inputs=["crosscoder"],
              outputs=["analysis/features.csv"],
              describe=f"{run}/analysis/ (features.csv, timelines.safetensors, figures/, browser/index.html)"),
    ]
    st.append(Stage("geometry", lambda: geometry(run, dataclasses.replace(cfg.geometry, steps=snapshot_steps(cfg)),
                                                 source=snapshot_source(cfg, device=cfg.geometry.device)),
                    cfg.geometry, inputs=snaps_in, outputs=["geometry.json"],
                    describe=f"{run}/geometry.json, {run}/figures/geometry_*.png"))
    st.append(Stage("evaluate", lambda: evaluate_stage(cfg), {"evaluate": cfg.evaluate, "snapshots": cfg.snapshots},
                    inputs=snaps_in, outputs=["eval/summary.json"],
                    describe=f"{run}/eval/ (per-token loss and KL per snapshot, summary.json)"))
    if cfg.interventions.enabled or "interventions" in force:
        st.append(Stage("interventions", lambda: interventions_stage(cfg),
                        {"interventions": cfg.interventions, "snapshots": cfg.snapshots},
                        inputs=snaps_in + (["crosscoder", "analyze"] if cfg.interventions.logit_effects else []),
                        outputs=["interventions.json"],
                        describe=f"{run}/interventions.json, {run}/figures/interventions_*.png, logit_lens.png"))
    st += [
        Stage("phases", lambda: phases(run, cfg.phases), cfg.phases,
              inputs=[s.name for s in st if s.name in ("pretrain", "analyze", "geometry", "evaluate")],
              outputs=["phases.json"], describe=f"{run}/phases.json, {run}/figures/phase_map.png"),
        Stage("report", lambda: build_report(run), {"version": 1},
              inputs=["phases", "analyze", "crosscoder"] + (["numbers"] if numbers_on(cfg) else [])
              + [s.name for s in st if s.name == "interventions"],
              outputs=["report.html"], describe=f"{run}/report.html"),
    ]
    return st


def run_study(cfg: RunConfig, force: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> dict:
    """Run (or resume) every stage of the study; returns stages.json's records."""
    if (name := _hub_name(cfg)) is not None:
        from evolution.sources.hub import require_hub
        from evolution.sources.snapshot_source import hub_revision

        s = cfg.snapshots
        require_hub(f"recipe {cfg.name!r} (checkpoints of {name})", [name], cache_dir=s.cache_dir,
                    # transformer-lens reads the architecture from `main`, the weights from each revision
                    revisions=["main"] + [hub_revision(name, step) for step in snapshot_steps(cfg)])
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "run.json", to_dict(cfg))
    stages = stages_for(cfg, tuple(force) + tuple(only))
    if only:
        unknown = sorted(set(only) - {s.name for s in stages})
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; this recipe has {[s.name for s in stages]}")
        force = tuple(force) + tuple(only)
        last = max(i for i, s in enumerate(stages) if s.name in only)
        stages = stages[: last + 1]
    records = run_stages(run, stages, force=force, log=lambda s: print(s, file=sys.stderr, flush=True))
    return records
