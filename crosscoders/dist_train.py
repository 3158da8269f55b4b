"""`torchrun --nproc_per_node=N -m crosscoders.dist_train --store DIR --out DIR [--source-parallel P] [flags]`.

Each rank reads its rows and snapshots of every global batch of the store (`distributed.shard_batches`)
and trains its share (crosscoders/distributed.py); rank 0 writes the log, the checkpoints and the model.
The flags are `python -m crosscoders.train`'s. A rank that dies makes the others fail at their next
collective (gloo / NCCL raise, torchrun stops the job and names the rank); no checkpoint is committed
after the last one every rank reached.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from .config import CrosscoderConfig, TrainConfig
from .dataclass_cli import add_arguments, from_dict
from .distributed import Distributed, shard_batches
from .mesh import Mesh
from .model import Crosscoder
from .train import check_epochs, train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a crosscoder on an activation store with torch.distributed.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.add_argument("--store", required=True, help="activation store directory (manifest.json + shards)")
    p.add_argument("--out", required=True, help="output directory (model, log, checkpoint)")
    p.add_argument("--seed-data", type=int, default=0, help="seed of the store's shuffled reader")
    p.add_argument("--source-parallel", type=int, default=1,
                   help="ranks that split the snapshots (P); the other factor of the world size splits the batch")
    p.add_argument("--stop-at-step", type=int, default=0,
                   help="end this job after that step (a checkpoint step: set checkpoint_every to divide it), to go "
                        "on later from the checkpoint, e.g. in scheduler slots shorter than the run (0 = never)")
    p.add_argument("--backend", default=None, help="torch.distributed backend (default: nccl on cuda, gloo on cpu)")
    add_arguments(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    add_arguments(p.add_argument_group("model (CrosscoderConfig)"), CrosscoderConfig)
    return p


def main(argv: list[str] | None = None) -> Crosscoder:
    ns = vars(parser().parse_args(argv))
    ns.pop("debug")
    store_dir, out_dir, seed_data = ns.pop("store"), ns.pop("out"), ns.pop("seed_data")
    source_parallel, backend, stop = ns.pop("source_parallel"), ns.pop("backend"), ns.pop("stop_at_step")
    cc_fields = set(CrosscoderConfig.__dataclass_fields__)
    cc = json.loads(ns.pop("crosscoder")) if "crosscoder" in ns else {}
    cc.update({k: ns.pop(k) for k in list(ns) if k in cc_fields})

    from .store import ActivationStore

    store = ActivationStore(store_dir)
    scales = torch.as_tensor(store.scales, dtype=torch.float32)
    cc.setdefault("n_sources", len(scales))
    cc.setdefault("d_in", int(store.manifest["d_in"]))
    cfg = from_dict(TrainConfig, {**ns, "crosscoder": cc})
    store.check_matches(cfg.crosscoder.n_sources, cfg.crosscoder.d_in)
    mesh = Mesh.init(source_parallel, device=cfg.device, backend=backend)
    mesh.source_slice(cfg.crosscoder.n_sources)  # refuse a split that does not divide before any work
    if mesh.rank == 0:
        check_epochs(cfg, store.n_tokens)

    def source(start: int):
        # the single-process reader's global batches, deterministic for a seed; this rank's block of each
        glob = store.batches(cfg.batch_size, seed=seed_data, normalize=True, start_batch=start)
        mine = shard_batches(mesh, glob, cfg.crosscoder.n_sources)
        return itertools.islice(mine, max(stop - start, 0)) if stop else mine

    return train(cfg, source, out_dir, norm_scale=scales, parallel=Distributed(mesh))


if __name__ == "__main__":
    from .errors import run_cli

    rc = run_cli(main, sys.argv[1:], "crosscoders.dist_train")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(rc)
