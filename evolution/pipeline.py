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
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from crosscoders.config import TrainConfig
from crosscoders.dataclass_cli import from_dict, to_dict
from crosscoders.io import write_json
from evolution.features.analyze import AnalyzeConfig
from evolution.geometry.stage import GeometryConfig
from evolution.phases.snapshot_eval import EvaluateConfig
from evolution.phases.stage import PhasesConfig
from evolution.scale import ParallelConfig
from evolution.sources.corpus import CorpusConfig
from evolution.sources.pretrain import PretrainConfig
from evolution.stages import Stage, run_stages


@dataclass
class SnapshotsConfig:
    """Where the snapshots come from and which of them the study uses."""

    source: str = "pretrain"
    """"pretrain" (train a mini-Pythia in this run), "local:<dir>" (a directory of step{N} HF checkpoints),
    or "hf:EleutherAI/pythia-70m" (Pythia's checkpoints from the hub, through transformer-lens)."""
    steps: list[int] | None = None
    """Steps to use (None: every saved step; for the hub, Ge et al. 2025's 32 steps)."""


@dataclass
class HarvestConfig:
    """Which activations the crosscoder is trained on."""

    hook: str = "blocks.1.hook_resid_post"
    """transformer-lens hook name (Ge et al. 2025: blocks.6.hook_resid_post of Pythia-160M)."""
    n_seqs: int = 1024
    """Corpus rows harvested for training (tokens = n_seqs × (seq_len − 1), BOS excluded)."""
    n_eval_seqs: int = 64
    """Held-out corpus rows harvested for the crosscoder's per-snapshot evaluation (FVU, L0, dead)."""
    batch_size: int = 64
    """Sequences per forward pass."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Storage dtype of the activation store."""
    device: str = "cpu"
    """Device the snapshots run on."""
    autocast: Literal["auto", "none", "bf16"] = "auto"
    """Precision of the snapshots' forward passes: "auto" = bf16 only where measured faster on the device."""
    mode: Literal["store", "stream"] = "store"
    """store: harvest the activations to disk, then train; stream: no store, the snapshots compute each window of
    activations as training consumes it (zero disk; all this rank's snapshots in memory; evolution/scale.py)."""
    stream_buffer_seqs: int = 256
    """stream: sequences per shuffle window and stream shard; their tokens are mixed and drawn without replacement
    (memory: stream_buffer_seqs x seq_len x n_sources x d_in x 4 bytes per shard)."""
    stream_shards: int = 1
    """stream: disjoint token ranges the stream reads in parallel, each batch_size / stream_shards rows of every
    batch; a multiple of the data-parallel size. Runs with the same value give the same batches on any number of ranks."""


@dataclass
class RunConfig:
    """A whole study: one TOML recipe, one run directory `root/name/`."""

    name: str = "demo"
    """Run name: results go to `root/name/`."""
    root: str = "runs"
    """Directory holding run directories."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """[corpus]: the token stream."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """[pretrain]: mini-Pythia training (only with snapshots.source = "pretrain")."""
    snapshots: SnapshotsConfig = field(default_factory=SnapshotsConfig)
    """[snapshots]: where the checkpoints come from."""
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    """[harvest]: hook and amount of activations."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """[train] and [train.crosscoder]: the crosscoder and its training."""
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    """[analyze]: timelines, probes, browser."""
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    """[geometry]: linearity, anisotropy, intrinsic dimension per layer and snapshot."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """[evaluate]: every snapshot's held-out loss and KL to the unigram / bigram distributions, per token."""
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    """[phases]: combination of the phase signals."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """[parallel]: torch.distributed ranks for the crosscoder stage (evolution/scale.py)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name


def load_recipe(path: str | Path, **overrides) -> RunConfig:
    """Read a TOML recipe into a RunConfig (unknown keys are an error naming the table)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} not found; recipes live in runs/*.toml")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    data.setdefault("name", path.stem)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return from_dict(RunConfig, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# ------------------------------------------------------------------------------------------ stages


def _hub_name(cfg: RunConfig) -> str | None:
    src = cfg.snapshots.source
    return src.removeprefix("hf:") if src.startswith("hf:") else None


def snapshot_steps(cfg: RunConfig) -> list[int]:
    from evolution.sources.snapshots import GE2025_STEPS, local_steps

    if _hub_name(cfg):
        return list(cfg.snapshots.steps or GE2025_STEPS)
    found = local_steps(snapshot_root(cfg))
    if cfg.snapshots.steps is None:
        return found
    missing = sorted(set(cfg.snapshots.steps) - set(found))
    if missing:
        raise FileNotFoundError(f"snapshot steps {missing} not under {snapshot_root(cfg)}; available: {found}")
    return sorted(cfg.snapshots.steps)


def snapshot_root(cfg: RunConfig) -> Path:
    src = cfg.snapshots.source
    if src == "pretrain":
        return cfg.run_dir / "snapshots"
    if src.startswith("local:"):
        return Path(src.removeprefix("local:"))
    raise ValueError(f"snapshots.source {src!r} has no local root")


def _loaders(cfg: RunConfig, steps: list[int]):
    """One zero-argument loader per snapshot, so harvest keeps one model in memory at a time."""
    from evolution.sources.snapshots import load_local_snapshot, load_pythia_snapshot

    dev = cfg.harvest.device
    if (name := _hub_name(cfg)) is not None:
        return [lambda s=s: load_pythia_snapshot(name, s, dev) for s in steps]
    root = snapshot_root(cfg)
    return [lambda s=s: load_local_snapshot(root / f"step{s}", dev) for s in steps]


def build_corpus_stage(cfg: RunConfig) -> None:
    from evolution.sources.corpus import build_corpus

    build_corpus(cfg.corpus).save(cfg.run_dir)


def pretrain_stage(cfg: RunConfig) -> None:
    from evolution.sources.corpus import Corpus
    from evolution.sources.pretrain import pretrain

    pretrain(cfg.pretrain, Corpus.load(cfg.run_dir / "corpus"), cfg.run_dir)
    loss_outputs(cfg.run_dir)


def loss_outputs(run: Path) -> None:
    """`figures/loss.png` and, on the planted corpus, the step each mechanism was learned at."""
    from crosscoders.io import read_jsonl
    from evolution.phases.loss import learned_steps, save_loss_figure

    save_loss_figure(run)
    meta = json.loads((run / "corpus" / "meta.json").read_text())
    refs = meta.get("mechanism_references")
    if refs:
        write_json(run / "pretrain" / "learned_steps.json", learned_steps(read_jsonl(run / "pretrain" / "log.jsonl"), refs))


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
    steps = snapshot_steps(cfg)
    if len(steps) < 2:
        raise ValueError(f"a crosscoder across snapshots needs ≥ 2 snapshots, found steps {steps}")
    sources = [f"step{s}" for s in steps]
    common = dict(hook=h.hook, sources=sources, batch_size=h.batch_size, dtype=h.dtype, autocast=h.autocast,
                  bos_token_id=corpus.bos_token_id, strategy="snapshot")
    harvest(_loaders(cfg, steps), corpus.tokens[: h.n_seqs], out_dir=run / "activations" / h.hook, **common)
    eval_tokens = corpus.eval_tokens if corpus.eval_tokens is not None else corpus.tokens[-h.n_eval_seqs:]
    harvest(_loaders(cfg, steps), eval_tokens[: h.n_eval_seqs], out_dir=run / "activations_eval" / h.hook, **common)


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
    from evolution.phases.snapshot_eval import evaluate_snapshots

    steps = snapshot_steps(cfg)
    evaluate_snapshots(cfg.run_dir, steps, _loaders(cfg, steps), cfg.evaluate)
    if (cfg.run_dir / "pretrain" / "log.jsonl").exists():  # redraw its reference lines with the held-out estimator
        from evolution.phases.loss import save_loss_figure

        save_loss_figure(cfg.run_dir)


def evaluate_cli(argv: list[str] | None = None) -> None:
    """`feature-evolution evaluate RUN --batch-size 8 ...`: the evaluate stage alone on a run directory
    (snapshot source and steps from its run.json), without re-checking the stages before it."""
    import argparse

    from crosscoders.dataclass_cli import add_arguments

    parser = argparse.ArgumentParser(description="per-snapshot held-out loss and KL to the unigram/bigram distributions")
    parser.add_argument("run_dir")
    add_arguments(parser, EvaluateConfig)
    ns = vars(parser.parse_args(argv))
    run_dir = Path(ns.pop("run_dir"))
    cfg = from_dict(RunConfig, json.loads((run_dir / "run.json").read_text()))
    cfg = dataclasses.replace(cfg, root=str(run_dir.parent), name=run_dir.name, evaluate=from_dict(EvaluateConfig, ns))
    evaluate_stage(cfg)


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
    hub = _hub_name(cfg)
    snaps_in = ["corpus"] if hub else ["pretrain"]
    st = [Stage("corpus", lambda: build_corpus_stage(cfg), cfg.corpus, outputs=["corpus/tokens.safetensors"],
                describe=f"{run}/corpus/ (tokens, tokenizer, meta.json)")]
    if cfg.snapshots.source == "pretrain":
        st.append(Stage("pretrain", lambda: pretrain_stage(cfg), cfg.pretrain, inputs=["corpus"],
                        outputs=["pretrain/log.jsonl", "figures/loss.png"],
                        clean=_remover(run / "pretrain", run / "snapshots"),
                        describe=f"{run}/snapshots/step*/, {run}/pretrain/log.jsonl, {run}/figures/loss.png"))
    elif not hub:
        snaps_in = ["corpus"]
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
    if not hub:  # geometry reads local snapshots; on the hub it would download every step again
        st.append(Stage("geometry", lambda: geometry(run, dataclasses.replace(cfg.geometry, steps=snapshot_steps(cfg))),
                        cfg.geometry, inputs=snaps_in, outputs=["geometry.json"],
                        describe=f"{run}/geometry.json, {run}/figures/geometry_*.png"))
    st.append(Stage("evaluate", lambda: evaluate_stage(cfg), {"evaluate": cfg.evaluate, "snapshots": cfg.snapshots},
                    inputs=snaps_in, outputs=["eval/summary.json"],
                    describe=f"{run}/eval/ (per-token loss and KL per snapshot, summary.json)"))
    st += [
        Stage("phases", lambda: phases(run, cfg.phases), cfg.phases,
              inputs=[s.name for s in st if s.name in ("pretrain", "analyze", "geometry", "evaluate")],
              outputs=["phases.json"], describe=f"{run}/phases.json, {run}/figures/phase_map.png"),
        Stage("report", lambda: build_report(run), {"version": 1}, inputs=["phases", "analyze", "crosscoder"],
              outputs=["report.html"], describe=f"{run}/report.html"),
    ]
    return st


def run_study(cfg: RunConfig, force: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> dict:
    """Run (or resume) every stage of the study; returns stages.json's records."""
    if (name := _hub_name(cfg)) is not None:
        from evolution.sources.hub import require_hub

        require_hub(f"recipe {cfg.name!r} (Pythia checkpoints {name})", [name])
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "run.json", to_dict(cfg))
    stages = stages_for(cfg)
    if only:
        unknown = sorted(set(only) - {s.name for s in stages})
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; this recipe has {[s.name for s in stages]}")
        force = tuple(force) + tuple(only)
        last = max(i for i, s in enumerate(stages) if s.name in only)
        stages = stages[: last + 1]
    records = run_stages(run, stages, force=force, log=lambda s: print(s, file=sys.stderr, flush=True))
    return records
