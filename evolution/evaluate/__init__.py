"""The evaluate stage: every snapshot on the held-out tokens (loss, per-mechanism loss, KL to the unigram and
bigram distributions, per token), through the run's one snapshot source."""

from evolution.evaluate.snapshots import EvaluateConfig, evaluate_snapshots, evaluate_stage, read_eval

__all__ = ["EvaluateConfig", "evaluate_snapshots", "evaluate_stage", "read_eval"]
