"""The crosscoder stage: one path for one process and for torchrun ranks, then its evaluation per snapshot."""

from evolution.crosscoder.stage import ParallelConfig, crosscoder_stage

__all__ = ["ParallelConfig", "crosscoder_stage"]
