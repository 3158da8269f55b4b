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
    cfg = dataclasses.replace(load_run_config(run_dir), evaluate=from_dict(EvaluateConfig, ns))
    evaluate_stage(cfg)


def interventions_cli(argv: list[str] | None = None) -> None:
    """`feature-evolution interventions RUN --n-eval-seqs 32 ...`: the interventions stage alone on a run
    directory (snapshot source and steps from its run.json), whether or not its recipe enables it."""
    import argparse

    from crosscoders.dataclass_cli import add_arguments

    parser = argparse.ArgumentParser(description="linear replacement, pruning, logit lens, feature logit effects")
    parser.add_argument("run_dir")
    add_arguments(parser, InterventionsConfig)
    ns = vars(parser.parse_args(argv))
    run_dir = Path(ns.pop("run_dir"))
    cfg = dataclasses.replace(load_run_config(run_dir), interventions=from_dict(InterventionsConfig, ns))
    interventions_stage(cfg)
