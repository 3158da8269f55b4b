"""A recipe (`runs/*.toml`) as a `RunConfig`: one dataclass per TOML table, so every knob of every stage is
reachable from the recipe (and, through `crosscoders.dataclass_cli`, from the CLI) and recorded in `run.json`.
The stages that run a `RunConfig` are in `evolution.pipeline` (which re-exports these names)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from crosscoders.config import TrainConfig
from crosscoders.dataclass_cli import from_dict
from evolution.features.analyze import AnalyzeConfig
from evolution.geometry.stage import GeometryConfig
from evolution.interventions.stage import InterventionsConfig
from evolution.numbers.stage import NumbersConfig
from evolution.phases.snapshot_eval import EvaluateConfig
from evolution.phases.stage import PhasesConfig
from evolution.scale import ParallelConfig
from evolution.sources.corpus import CorpusConfig
from evolution.sources.pretrain import PretrainConfig


@dataclass
class SnapshotsConfig:
    """Where the snapshots come from and which of them the study uses."""

    source: str = "pretrain"
    """"pretrain" (train a mini-Pythia in this run), "local:<dir>" (a directory of step{N} HF checkpoints:
    GPT-NeoX, GPT-2 or Llama-style), or "hf:EleutherAI/pythia-70m" (Pythia's checkpoints from the hub, through
    transformer-lens). Every stage reads them through evolution.sources.snapshot_source.SnapshotSource."""
    steps: list[int] | None = None
    """Steps to use (None: every saved step; for the hub, Ge et al. 2025's 32 steps)."""
    cache_dir: str | None = None
    """hf: sources: the Hugging Face hub cache to read revisions from (None: the default, HF_HUB_CACHE)."""
    local_files_only: bool = False
    """hf: sources: use only revisions already in the cache (offline), never the network."""


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
    numbers: NumbersConfig = field(default_factory=NumbersConfig)
    """[numbers]: the number helix across snapshots (Kantamneni & Tegmark 2025); on when the corpus has numbers."""
    interventions: InterventionsConfig = field(default_factory=InterventionsConfig)
    """[interventions]: linear replacement / removal of blocks, pruning, logit lens, feature logit effects
    per snapshot (off unless `enabled = true`)."""
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


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig a run directory was made with (its run.json), rooted where the directory now is."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no run.json): run a recipe first")
    cfg = from_dict(RunConfig, json.loads((run_dir / "run.json").read_text()))
    return dataclasses.replace(cfg, root=str(run_dir.parent), name=run_dir.name)
