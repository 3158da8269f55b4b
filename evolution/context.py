"""The run context: what every stage receives.

    ctx = RunContext(cfg)            # cfg: the resolved recipe (evolution.recipe.RunConfig)
    ctx.run_dir                      # where every stage reads and writes
    ctx.source                       # the one SnapshotSource, built once: (step, model) pairs for every stage
    ctx.corpus                       # the token stream (corpus/), loaded once
    ctx.mesh                         # this process's place in a torchrun job, or Mesh.single()

A stage takes `ctx` and reads its own table of the config (`ctx.cfg.harvest`, `ctx.cfg.geometry`, ...), so
following the config from the runner into a stage never climbs back up: the context is built once by
`evolution.pipeline` (or by a torchrun rank from the run's run.json) and handed down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from crosscoders.errors import UserError
from crosscoders.mesh import Mesh
from evolution.sources.corpus import Corpus
from evolution.sources.snapshot_source import SnapshotSource


def under_torchrun() -> bool:
    """Whether this process is one rank of a `torchrun` job (torchrun sets RANK and LOCAL_RANK)."""
    return "RANK" in os.environ and "LOCAL_RANK" in os.environ


@dataclass
class RunContext:
    cfg: Any
    """The resolved recipe, `evolution.recipe.RunConfig` (one table per stage)."""
    mesh: Mesh = field(default_factory=Mesh.single)
    """This process's place in a torchrun job running a stage (`Mesh.single()` in one process)."""

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @cached_property
    def source(self) -> SnapshotSource:
        """The run's snapshots, checked once (missing steps are a SnapshotError listing those available)."""
        s = self.cfg.snapshots
        return SnapshotSource(s.source, s.steps, run_dir=self.run_dir, device=self.cfg.harvest.device,
                              cache_dir=s.cache_dir, local_files_only=s.local_files_only)

    @property
    def steps(self) -> list[int]:
        return self.source.steps

    def crosscoder_sources(self) -> list[str]:
        """The crosscoder's source names, `step{N}` per snapshot; a crosscoder across snapshots needs ≥ 2."""
        if len(self.steps) < 2:
            raise UserError(f"a crosscoder across snapshots needs ≥ 2 snapshots, found steps {self.steps}")
        return [f"step{s}" for s in self.steps]

    def loaders(self, device: str | None = None) -> list:
        """One zero-argument loader per snapshot, so a stage keeps one model in memory at a time."""
        return self.source.loaders(device=device)

    @cached_property
    def corpus(self) -> Corpus:
        return Corpus.load(self.run_dir / "corpus")

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the stage's shared outputs (rank 0 of a torchrun job)."""
        return self.mesh.rank == 0
