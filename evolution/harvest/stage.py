"""The harvest stage: one function, three modes.

    [harvest] mode = "store"                        # one process: every snapshot into activations/<hook>/
    [harvest] mode = "store", [parallel] nproc_per_node = 8   # torchrun ranks: rank r harvests snapshots
                                                    # r, r + W, ... then writes its 1/W of the shards; rank 0
                                                    # creates and finishes the store (crosscoders.harvest)
    [harvest] mode = "stream"                       # no store: the normalisation scales on the first window, in a
                                                    # stream manifest that names the hook and sources for later stages

Store mode writes the training store (`n_seqs` corpus rows) and the held-out store (`n_eval_seqs` of the
corpus's eval rows), both with the same metadata: the token stream's and the snapshots' identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from crosscoders.errors import UserError
from crosscoders.harvest import harvest
from crosscoders.io import write_json
from crosscoders.mesh import resolve_nproc
from crosscoders.stream import measure_stream_scales
from evolution.context import RunContext

STREAM_FORMAT = "feature-evolution/stream"


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
    activations as training consumes it (zero disk; all this rank's snapshots in memory)."""
    stream_buffer_seqs: int = 256
    """stream: sequences per shuffle window and stream shard; their tokens are mixed and drawn without replacement
    (memory: stream_buffer_seqs x seq_len x n_sources x d_in x 4 bytes per shard)."""
    stream_shards: int = 1
    """stream: disjoint token ranges the stream reads in parallel, each batch_size / stream_shards rows of every
    batch; a multiple of the data-parallel size. Runs with the same value give the same batches on any number of ranks."""


def harvest_ranks(cfg) -> int:
    """Processes the harvest stage runs on: store mode shares the snapshots over `[parallel] nproc_per_node`."""
    return resolve_nproc(cfg.parallel.nproc_per_node, cfg.harvest.device) if cfg.harvest.mode == "store" else 1


def store_metadata(ctx: RunContext) -> dict:
    """The store manifest's `metadata`: the token stream's and the snapshots' identity, after checking that
    the corpus fits the snapshots (before any model runs)."""
    ctx.source.check_corpus(ctx.corpus)
    meta = json.loads((ctx.run_dir / "corpus" / "meta.json").read_text())
    stream = {k: meta.get(k) for k in ("tokenizer_hash", "tokenizer_from", "text_source", "vocab_size")}
    return {"token_stream": stream, "snapshots": ctx.source.describe()}


def harvest_stage(ctx: RunContext) -> None:
    """The harvest stage on this process's share of the snapshots (all of them in one process)."""
    h, corpus, mesh = ctx.cfg.harvest, ctx.corpus, ctx.mesh
    sources = ctx.crosscoder_sources()
    if h.mode == "stream":
        n = min(h.stream_buffer_seqs, h.n_seqs)
        scales, d_in = measure_stream_scales(ctx.loaders(), corpus.tokens[:n], h.hook, n, model_batch=h.batch_size,
                                             bos_token_id=corpus.bos_token_id, autocast=h.autocast)
        write_json(ctx.run_dir / "activations" / h.hook / "manifest.json",
                   {"format": STREAM_FORMAT, "version": 1, "hook": h.hook, "sources": sources, "d_in": d_in,
                    "scales": scales.tolist(), "scale_seqs": n, "n_seqs": h.n_seqs})
        return
    if mesh.world > len(sources):
        raise UserError(f"{mesh.world} ranks for {len(sources)} snapshots: use at most {len(sources)} for the harvest")
    metadata = store_metadata(ctx)
    mine = list(range(mesh.rank, len(sources), mesh.world))
    for tokens, store in [(corpus.tokens[: h.n_seqs], "activations"), (corpus.eval_tokens[: h.n_eval_seqs], "activations_eval")]:
        harvest(ctx.loaders(), tokens, h.hook, ctx.run_dir / store / h.hook, sources=sources, batch_size=h.batch_size,
                dtype=h.dtype, bos_token_id=corpus.bos_token_id, strategy="snapshot", metadata=metadata,
                autocast=h.autocast, own=mine, writer=ctx.is_writer, share=(mesh.rank, mesh.world), wait=mesh.barrier,
                progress=ctx.is_writer)
