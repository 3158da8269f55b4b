"""What the harvest stage made, read back the same way whichever mode made it: the crosscoder's shapes and
normalisation scales, this rank's training batches, and the held-out batches it is evaluated on.

    acts = activations(ctx)                 # store: activations/<hook>/ shards; stream: its manifest
    acts.n_sources, acts.d_in, acts.scales
    acts.training_batches(tcfg, mesh)       # start_step -> this rank's block of every global batch
    acts.eval_batches()                     # raw (unnormalised) held-out batches, one process
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import Tensor

from crosscoders.errors import UserError
from crosscoders.harvest import keep_mask, model_acts
from crosscoders.mesh import Mesh
from crosscoders.store import ActivationStore, StoreError
from crosscoders.stream import ShuffleStream
from crosscoders.train import check_epochs
from evolution.context import RunContext
from evolution.harvest.stage import STREAM_FORMAT

EVAL_BATCH = 1024
"""Rows per held-out batch (the evaluation's memory, not its result)."""


@dataclass
class Activations:
    ctx: RunContext
    manifest: dict
    store: ActivationStore | None = None
    """The training store (store mode); None in stream mode."""

    @property
    def mode(self) -> str:
        return "store" if self.store is not None else "stream"

    @property
    def sources(self) -> list[str]:
        return list(self.manifest["sources"])

    @property
    def n_sources(self) -> int:
        return len(self.manifest["sources"])

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def scales(self) -> Tensor:
        return torch.as_tensor(self.manifest["scales"], dtype=torch.float32)

    def training_batches(self, tcfg, mesh: Mesh):
        """`start_step -> batches` of this rank's rows and sources, normalised (`crosscoders.train`'s contract)."""
        if self.store is None:
            return self._stream(tcfg, mesh)
        store = self.store
        verify_share(store, mesh)
        if mesh.rank == 0:
            check_epochs(tcfg, store.n_tokens)  # warns when the run would cycle the stored tokens many times

        def batches(start: int):  # this rank reads only its rows and snapshots of every global batch
            return store.batches(tcfg.batch_size, seed=tcfg.crosscoder.seed, normalize=True, start_batch=start,
                                 rows=(mesh.data_rank, mesh.data), sources=mesh.source_slice(self.n_sources))
        return batches

    def _stream(self, tcfg, mesh: Mesh) -> ShuffleStream:
        h, corpus = self.ctx.cfg.harvest, self.ctx.corpus
        K, D = h.stream_shards, mesh.data
        if K % D or tcfg.batch_size % K:
            raise UserError(f"[harvest] stream_shards = {K} must be a multiple of the data-parallel size {D} and "
                            f"divide [train] batch_size = {tcfg.batch_size}")
        block = mesh.source_slice(self.n_sources)
        d = mesh.data_rank
        return ShuffleStream(self.ctx.loaders()[block], corpus.tokens[: h.n_seqs], h.hook, tcfg.batch_size // K,
                             buffer_seqs=h.stream_buffer_seqs, seed=tcfg.crosscoder.seed, data_size=K,
                             data_ranks=range(d * K // D, (d + 1) * K // D), scales=self.scales[block],
                             model_batch=h.batch_size, bos_token_id=corpus.bos_token_id, autocast=h.autocast,
                             device=h.device)

    def eval_batches(self) -> list[Tensor] | object:
        """Raw held-out activations [rows, n_sources, d_in] in batches: the held-out store, or (stream mode)
        computed from the corpus's eval rows one snapshot at a time."""
        h = self.ctx.cfg.harvest
        if self.mode == "store":
            ev = ActivationStore(self.ctx.run_dir / "activations_eval" / h.hook)
            ev.check_matches(self.n_sources, self.d_in)
            return ev.batches(EVAL_BATCH, seed=0, normalize=False, n_epochs=1)
        corpus = self.ctx.corpus
        tokens = corpus.eval_tokens[: h.n_eval_seqs]
        keep = keep_mask(tokens, bos_token_id=corpus.bos_token_id)
        acts = [model_acts(load(), tokens, [h.hook], h.batch_size, "cache", h.autocast)[h.hook][keep]
                for load in self.ctx.loaders()]  # one snapshot in memory at a time
        return list(torch.stack(acts, 1).split(EVAL_BATCH))


def verify_share(store: ActivationStore, mesh: Mesh) -> None:
    """Every rank checks its share of the shards (size, sha256, shapes, finite values) before training reads
    them: rank 0 reading the whole store (~150 GB for Pythia-160M x 32 snapshots) kept the others waiting
    at their first collective, past its timeout. Every rank raises if any shard is damaged."""
    err = None
    for i in range(mesh.rank, len(store.shard_sizes), mesh.world):
        try:
            store.load_shard(i)
        except StoreError as e:
            err = e
            break
    bad = mesh.reduce_(torch.tensor([float(err is not None)], device=mesh.device), "world")
    if err is not None:
        raise err
    if bad.item():
        raise StoreError(f"{store.dir}: another rank found a damaged shard (its message is in its log)")


def activations(ctx: RunContext) -> Activations:
    """The harvest stage's result for this run (its manifest names the hook, sources and scales)."""
    d = ctx.run_dir / "activations" / ctx.cfg.harvest.hook
    path = d / "manifest.json"
    if not path.exists():
        raise UserError(f"{path}: no activations; run the harvest stage first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") == STREAM_FORMAT:
        return Activations(ctx, manifest)
    store = ActivationStore(d)  # a complete store (an unfinished one is refused)
    return Activations(ctx, store.manifest, store)
