"""The CLI verbs that run one stage on an existing run directory with their own flags
(`feature-evolution evaluate RUN ...`, `feature-evolution interventions RUN ...`): the snapshot source and
steps come from the run's run.json, and the stages before it are not re-checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from crosscoders.dataclass_cli import from_dict
from evolution.interventions.stage import InterventionsConfig
from evolution.phases.snapshot_eval import EvaluateConfig
from evolution.pipeline import evaluate_stage, interventions_stage
from evolution.recipe import load_run_config


def _stage_on_run(argv: list[str] | None, description: str, table: str, config_cls, stage) -> None:
    """Parse `RUN --flags` (the flags are `config_cls`'s fields), put that config under the run config's
    `table`, and run `stage` on it."""
    import argparse

    from crosscoders.dataclass_cli import add_arguments

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("run_dir")
    add_arguments(parser, config_cls)
    ns = vars(parser.parse_args(argv))
    run_dir = Path(ns.pop("run_dir"))
    stage(dataclasses.replace(load_run_config(run_dir), **{table: from_dict(config_cls, ns)}))


def evaluate_cli(argv: list[str] | None = None) -> None:
    """`feature-evolution evaluate RUN --batch-size 8 ...`: the evaluate stage alone on a run directory
    (snapshot source and steps from its run.json), without re-checking the stages before it."""
    _stage_on_run(argv, "per-snapshot held-out loss and KL to the unigram/bigram distributions", "evaluate",
                  EvaluateConfig, evaluate_stage)


def interventions_cli(argv: list[str] | None = None) -> None:
    """`feature-evolution interventions RUN --n-eval-seqs 32 ...`: the interventions stage alone on a run
    directory (snapshot source and steps from its run.json), whether or not its recipe enables it."""
    _stage_on_run(argv, "linear replacement, pruning, logit lens, feature logit effects", "interventions",
                  InterventionsConfig, interventions_stage)
