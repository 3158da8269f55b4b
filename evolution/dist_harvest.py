"""The harvest stage on torchrun ranks (store mode, `[parallel] nproc_per_node > 1`): one store, one manifest.

Rank r harvests snapshots r, r + W, r + 2W, ... (W ranks), each into a one-source store beside the target
(`.<hook>.source007/`, the single-process harvest's chunking: the same `shard_seqs`, token stream and
metadata); after a barrier rank 0 stacks shard i of every one-source store into shard i of the target,
which is then byte for byte the store one process writes (tests/test_scale.py), and deletes them. Each
step resumes: a one-source store continues after its last shard, the merge after the target's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from crosscoders.errors import UserError
from crosscoders.harvest import harvest
from crosscoders.store import MANIFEST, ActivationStore, StoreWriter


def part_dir(out: Path, j: int) -> Path:
    return out.parent / f".{out.name}.source{j:03d}"


def merge(out: Path, parts: list[Path], sources: list[str], hook: str) -> ActivationStore:
    """Stack the one-source stores' shards (same chunking) into the store at `out`; delete the parts."""
    stores = [ActivationStore(p) for p in parts]
    m0 = stores[0].manifest
    if any(len(s.manifest["shards"]) != len(m0["shards"]) or s.manifest["token_stream"] != m0["token_stream"]
           for s in stores):
        raise UserError(f"the one-source stores beside {out} disagree in chunking or tokens: delete them and rerun")
    w = StoreWriter(out, sources, hook, m0["d_in"], m0["dtype"], m0["metadata"], m0["token_stream"], resume=True)
    for i in range(w.n_shards, len(m0["shards"])):
        shards = [s.load_shard(i) for s in stores]
        w.add(torch.cat([t["acts"] for t in shards], 1), shards[0]["tokens"], shards[0]["positions"])
    store = ActivationStore(out) if w.complete else w.finish()
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
    return store


def harvest_share(cfg, mesh) -> None:
    """This rank's snapshots of the training and held-out stores, then (rank 0) the merge."""
    from evolution.pipeline import _loaders, harvest_metadata, snapshot_source
    from evolution.scale import _steps_sources
    from evolution.sources.corpus import Corpus

    h, run = cfg.harvest, cfg.run_dir
    corpus = Corpus.load(run / "corpus")
    steps, sources = _steps_sources(cfg)
    if mesh.world > len(steps):
        raise UserError(f"{mesh.world} ranks for {len(steps)} snapshots: use at most {len(steps)} for the harvest")
    metadata = harvest_metadata(cfg, snapshot_source(cfg, steps), corpus)  # the single-process manifest's
    loaders = _loaders(cfg, steps)
    ev = corpus.eval_tokens if corpus.eval_tokens is not None else corpus.tokens[-h.n_eval_seqs:]
    jobs = [(corpus.tokens[: h.n_seqs], run / "activations" / h.hook), (ev[: h.n_eval_seqs], run / "activations_eval" / h.hook)]
    mine = list(range(mesh.rank, len(steps), mesh.world))
    cache = {}  # a rank with one snapshot loads it once for both stores
    for tokens, out in jobs:
        done = (out / MANIFEST).exists() and ActivationStore(out, require_complete=False).manifest.get("complete")
        if not done:
            for j in mine:
                model = cache[j] if j in cache else loaders[j]()
                if len(mine) == 1:
                    cache[j] = model
                d_in = int(model.cfg.d_model)
                # the single-process harvest's default chunking for the whole store (~64 MiB shards)
                shard_seqs = max(1, (64 << 20) // (tokens.shape[1] * len(steps) * d_in * (4 if h.dtype == "float32" else 2)))
                harvest([model], tokens, h.hook, part_dir(out, j), sources=[sources[j]], batch_size=h.batch_size,
                        dtype=h.dtype, shard_seqs=shard_seqs, bos_token_id=corpus.bos_token_id, strategy="chunk",
                        autocast=h.autocast, progress=mesh.rank == 0, metadata=metadata)
                del model
        mesh.barrier()
        if mesh.rank == 0 and not done:
            merge(out, [part_dir(out, j) for j in range(len(steps))], sources, h.hook)
        mesh.barrier()
