"""A recipe (`runs/*.toml`) as a `RunConfig`: one dataclass per TOML table, each the `Config` its stage exports,
so every knob of every stage is reachable from the recipe (and, through `crosscoders.dataclass_cli`, from the
CLI: `feature-evolution <stage> RUN --field value`) and recorded in `run.json`. `evolution.pipeline` runs it."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from crosscoders.config import TrainConfig
from crosscoders.dataclass_cli import from_dict
from evolution.crosscoder import ParallelConfig
from evolution.evaluate import EvaluateConfig
from evolution.features.analyze import AnalyzeConfig
from evolution.geometry.stage import GeometryConfig
from evolution.harvest import HarvestConfig
from evolution.interventions.stage import InterventionsConfig
from evolution.numbers.stage import NumbersConfig
from evolution.phases.stage import PhasesConfig
from evolution.sources.corpus import CorpusConfig
from evolution.sources.pretrain import PretrainConfig
from evolution.sources.snapshot_source import SnapshotsConfig


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
    """[parallel]: torch.distributed ranks for the harvest (store mode) and crosscoder stages."""

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
