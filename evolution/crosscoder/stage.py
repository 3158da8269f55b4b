"""The crosscoder stage: train on what the harvest stage made (store or stream), in this process or as one
rank of a torchrun job, then evaluate per snapshot on the held-out activations.

    [parallel] nproc_per_node = 8      # the runner starts this stage as 8 torchrun ranks (evolution/pipeline.py)
    [parallel] source_parallel = 4     # 4 ranks split the snapshots, 2 split the batch (crosscoders/distributed.py)

Every rank runs `crosscoder_stage(ctx)` with its mesh; rank 0 writes the model, then `crosscoder/eval.json`
(FVU, L0, dead and firing latents per snapshot) and `crosscoder/quality.png`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from crosscoders.distributed import Distributed
from crosscoders.errors import UserError
from crosscoders.evaluation import evaluate
from crosscoders.io import write_json
from crosscoders.mesh import resolve_nproc
from crosscoders.train import train
from evolution.context import RunContext
from evolution.crosscoder.plots import quality_figure
from evolution.crosscoder.quality import quality_check
from evolution.figures import save_figure
from evolution.harvest import activations


@dataclass
class ParallelConfig:
    """How many processes run the harvest (store mode) and crosscoder stages, and how they split the crosscoder."""

    nproc_per_node: int | Literal["auto"] = 1
    """Ranks torchrun starts for the crosscoder stage (and a store-mode harvest), one per GPU; 1 = this process;
    "auto" = one per visible GPU where [train] device is CUDA, else 1 (`crosscoders.mesh.resolve_nproc`). More
    ranks than GPUs, or a CUDA device on a machine without one, is refused before any model runs."""
    source_parallel: int = 1
    """Ranks that split the snapshots (must divide nproc_per_node and the number of snapshots); memory per
    rank falls as 1 / source_parallel. The other factor, nproc_per_node / source_parallel, splits the batch."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto = NCCL on CUDA, gloo on the CPU."""

    def __post_init__(self):
        if self.nproc_per_node != "auto":  # a flag's "8" arrives as a string
            try:
                self.nproc_per_node = int(self.nproc_per_node)
            except ValueError:
                raise UserError(f"[parallel] nproc_per_node must be a number or \"auto\", got {self.nproc_per_node!r}") from None


def crosscoder_ranks(cfg) -> int:
    """Ranks of the crosscoder stage: `nproc_per_node` resolved and checked against the GPUs of [train] device."""
    return resolve_nproc(cfg.parallel.nproc_per_node, cfg.train.device)


def crosscoder_stage(ctx: RunContext) -> None:
    acts = activations(ctx)
    mesh = ctx.mesh
    cc = dataclasses.replace(ctx.cfg.train.crosscoder, n_sources=acts.n_sources, d_in=acts.d_in)
    tcfg = dataclasses.replace(ctx.cfg.train, crosscoder=cc, progress=ctx.cfg.train.progress and ctx.is_writer)
    model = train(tcfg, acts.training_batches(tcfg, mesh), ctx.run_dir / "crosscoder", norm_scale=acts.scales,
                  parallel=Distributed(mesh) if mesh.world > 1 else None)
    if ctx.is_writer:
        write_eval(ctx, model, acts, tcfg)


def write_eval(ctx: RunContext, model, acts, tcfg) -> dict:
    """crosscoder/eval.json and quality.png. Per-source numbers count `activations_per_snapshot` > 0 (one
    definition everywhere); "l0_shared": latents active per token (in any source, per-source gate); "quality":
    the degenerate-dictionary check (`evolution.crosscoder.quality`), which also warns in the log."""
    ev = evaluate(model, acts.eval_batches())
    result = {"sources": acts.sources, "gate": model.cfg.gate, "fvu": ev["fvu"], "l0": ev["l0_per_source"],
              "dead_frac": ev["dead_frac_per_source"], "n_features_firing": ev["n_features_firing_per_source"],
              "l0_shared": ev["l0"], "dead_frac_shared": ev["dead_frac"],
              "fvu_mean": ev["fvu_mean"], "n_tokens": ev["n_tokens"]}
    result["quality"] = quality_check(result, tcfg)
    out = ctx.run_dir / "crosscoder"
    write_json(out / "eval.json", result)
    save_figure(quality_figure(result), out / "quality.png")
    return result
