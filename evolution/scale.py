"""Beyond one process: the crosscoder stage on torch.distributed ranks, and zero-disk streaming, from a recipe.

    [harvest] mode = "stream"                  # no activation store: activations computed as training reads them
    [parallel] nproc_per_node = 8              # the crosscoder stage runs as `torchrun --nproc_per_node=8`
    [parallel] source_parallel = 4             # 4 ranks split the snapshots, 2 split the batch

`feature-evolution run RECIPE` does the rest: in store mode with N > 1 the harvest stage runs on N ranks too,
each harvesting its share of the snapshots into one store (evolution/dist_harvest.py); in stream mode the harvest stage only measures the
normalisation scales on the first window (and writes them in `activations/<hook>/manifest.json`, format
"stream", which also names the hook and sources for the later stages); the crosscoder stage starts
`python -m torch.distributed.run --standalone --nproc_per_node=N -m evolution.scale RUN_DIR` when N > 1
(PyTorch's launcher; for several nodes run that command yourself with torchrun's --nnodes/--rdzv flags),
waits for it, and evaluates rank 0's model in this process. One rank per GPU (`device = "cuda"`: NCCL),
or CPU processes (gloo).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from crosscoders.errors import UserError
from crosscoders.io import write_json

STREAM_FORMAT = "feature-evolution/stream"


@dataclass
class ParallelConfig:
    """How many processes train the crosscoder, and how they split it (crosscoders/distributed.py)."""

    nproc_per_node: int = 1
    """Ranks torchrun starts for the crosscoder stage, one per GPU; 1 = train in this process."""
    source_parallel: int = 1
    """Ranks that split the snapshots (must divide nproc_per_node and the number of snapshots); memory per
    rank falls as 1 / source_parallel. The other factor, nproc_per_node / source_parallel, splits the batch."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto = NCCL on CUDA, gloo on the CPU."""


def _steps_sources(cfg) -> tuple[list[int], list[str]]:
    from evolution.pipeline import snapshot_steps

    steps = snapshot_steps(cfg)
    if len(steps) < 2:
        raise ValueError(f"a crosscoder across snapshots needs ≥ 2 snapshots, found steps {steps}")
    return steps, [f"step{s}" for s in steps]


def stream_harvest_stage(cfg) -> None:
    """Stream mode's harvest: the per-snapshot scales on the first window (one model in memory at a time)."""
    from crosscoders.stream import measure_stream_scales
    from evolution.pipeline import _loaders
    from evolution.sources.corpus import Corpus

    h = cfg.harvest
    steps, sources = _steps_sources(cfg)
    corpus = Corpus.load(cfg.run_dir / "corpus")
    n = min(h.stream_buffer_seqs, h.n_seqs)
    scales, d_in = measure_stream_scales(_loaders(cfg, steps), corpus.tokens[:n], h.hook, n, model_batch=h.batch_size,
                                         bos_token_id=corpus.bos_token_id, autocast=h.autocast)
    write_json(cfg.run_dir / "activations" / h.hook / "manifest.json",
               {"format": STREAM_FORMAT, "version": 1, "hook": h.hook, "sources": sources, "d_in": d_in,
                "scales": scales.tolist(), "scale_seqs": n, "n_seqs": h.n_seqs})


def _stream_manifest(cfg) -> dict:
    p = cfg.run_dir / "activations" / cfg.harvest.hook / "manifest.json"
    m = json.loads(p.read_text())
    if m.get("format") != STREAM_FORMAT:
        raise UserError(f"{p} is not a stream manifest: run the harvest stage with [harvest] mode = \"stream\"")
    return m


def train_rank(cfg, mesh=None):
    """This process's share of the crosscoder stage's training (all of it where `mesh` is None)."""
    from crosscoders.distributed import Distributed, shard_batches
    from crosscoders.store import ActivationStore
    from crosscoders.train import check_epochs, train

    h, run = cfg.harvest, cfg.run_dir
    rank0 = mesh is None or mesh.rank == 0
    if h.mode == "stream":
        m = _stream_manifest(cfg)
        n_sources, d_in, scales = len(m["sources"]), m["d_in"], torch.tensor(m["scales"])
    else:
        store = ActivationStore(run / "activations" / h.hook)
        if rank0:
            store.verify()
        n_sources, d_in, scales = store.n_sources, int(store.manifest["d_in"]), torch.as_tensor(store.scales)
    cc = dataclasses.replace(cfg.train.crosscoder, n_sources=n_sources, d_in=d_in)
    tcfg = dataclasses.replace(cfg.train, crosscoder=cc, progress=cfg.train.progress and rank0)
    block = mesh.source_slice(n_sources) if mesh else slice(0, n_sources)
    if h.mode == "stream":
        batches = _stream(cfg, tcfg, mesh, block, scales)
    else:
        if rank0:
            check_epochs(tcfg, store.n_tokens)

        def batches(start: int):
            b = store.batches(tcfg.batch_size, seed=tcfg.crosscoder.seed, normalize=True, start_batch=start)
            return shard_batches(mesh, b, n_sources) if mesh else b
    return train(tcfg, batches, run / "crosscoder", norm_scale=scales.float(),
                 parallel=Distributed(mesh) if mesh else None)


def _stream(cfg, tcfg, mesh, block: slice, scales: torch.Tensor):
    from crosscoders.stream import ShuffleStream
    from evolution.pipeline import _loaders
    from evolution.sources.corpus import Corpus

    h = cfg.harvest
    K, D = h.stream_shards, (mesh.data if mesh else 1)
    if K % D or tcfg.batch_size % K:
        raise UserError(f"[harvest] stream_shards = {K} must be a multiple of the data-parallel size {D} and divide "
                        f"[train] batch_size = {tcfg.batch_size}")
    d = mesh.data_rank if mesh else 0
    steps, _ = _steps_sources(cfg)
    corpus = Corpus.load(cfg.run_dir / "corpus")
    return ShuffleStream(_loaders(cfg, steps)[block], corpus.tokens[: h.n_seqs], h.hook, tcfg.batch_size // K,
                         buffer_seqs=h.stream_buffer_seqs, seed=tcfg.crosscoder.seed, data_size=K,
                         data_ranks=range(d * K // D, (d + 1) * K // D), scales=scales[block],
                         model_batch=h.batch_size, bos_token_id=corpus.bos_token_id, autocast=h.autocast)


def launch(cfg, verb: str = "train") -> None:
    """`torchrun --standalone --nproc_per_node=N -m evolution.scale {train|harvest} RUN_DIR`, output on this terminal."""
    n = cfg.parallel.nproc_per_node
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "evolution.scale", verb, str(cfg.run_dir)]
    print("crosscoder: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise UserError(f"the {n} {verb} ranks failed (torchrun exit code {rc}; each rank's message is above); "
                        "rerun the stage to resume from the last checkpoint every rank completed")


def crosscoder_stage_scaled(cfg) -> None:
    """The crosscoder stage in stream mode or on several ranks: train, then evaluate as the store path does."""
    from crosscoders.model import Crosscoder

    if cfg.parallel.nproc_per_node > 1:
        launch(cfg)
        model = Crosscoder.load(cfg.run_dir / "crosscoder")
    else:
        model = train_rank(cfg)
    write_eval(cfg, model)


def _eval_batches(cfg, n_sources: int):
    from crosscoders.harvest import keep_mask, model_acts
    from crosscoders.store import ActivationStore
    from evolution.pipeline import _loaders
    from evolution.sources.corpus import Corpus

    h = cfg.harvest
    if h.mode == "store":
        return ActivationStore(cfg.run_dir / "activations_eval" / h.hook).batches(1024, seed=0, normalize=False, n_epochs=1)
    corpus = Corpus.load(cfg.run_dir / "corpus")
    ev = corpus.eval_tokens if corpus.eval_tokens is not None else corpus.tokens[-h.n_eval_seqs:]
    ev = ev[: h.n_eval_seqs]
    keep = keep_mask(ev, bos_token_id=corpus.bos_token_id)
    acts = []
    for load in _loaders(cfg, _steps_sources(cfg)[0]):  # one snapshot in memory at a time
        acts.append(model_acts(load(), ev, [h.hook], h.batch_size, "cache", h.autocast)[h.hook][keep])
    x = torch.stack(acts, 1)
    return list(x.split(1024))


def write_eval(cfg, model) -> None:
    """crosscoder/eval.json and quality.png, as `pipeline.crosscoder_stage` writes them."""
    from crosscoders.train import evaluate
    from evolution.features.plots import quality_figure
    from evolution.figures import save_figure

    ev = evaluate(model, _eval_batches(cfg, model.cfg.n_sources))
    out = cfg.run_dir / "crosscoder"
    result = {"sources": _steps_sources(cfg)[1], "gate": model.cfg.gate, "fvu": ev["fvu"], "l0": ev["l0_per_source"],
              "dead_frac": ev["dead_frac_per_source"], "n_features_firing": ev["n_features_firing_per_source"],
              "l0_shared": ev["l0"], "dead_frac_shared": ev["dead_frac"],
              "fvu_mean": ev["fvu_mean"], "n_tokens": ev["n_tokens"]}
    write_json(out / "eval.json", result)
    save_figure(quality_figure(result), out / "quality.png")


def main(argv: list[str] | None = None) -> None:
    """torchrun's entry: `torchrun --nproc_per_node=N -m evolution.scale {train|harvest} RUN_DIR` (RUN_DIR/run.json is
    the recipe): the crosscoder stage's training, or (store mode) the harvest split by snapshot."""
    from crosscoders.mesh import Mesh
    from evolution.recipe import load_run_config

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("train", "harvest"):
        raise UserError("usage: torchrun --nproc_per_node=N -m evolution.scale {train|harvest} RUN_DIR")
    verb, run_dir = argv[0], Path(argv[1])
    if not (run_dir / "run.json").exists():
        raise UserError(f"{run_dir}: no run.json; run `feature-evolution run RECIPE` (it starts this) first")
    cfg = load_run_config(run_dir)
    p = cfg.parallel
    device = cfg.train.device if verb == "train" else cfg.harvest.device
    mesh = Mesh.init(p.source_parallel if verb == "train" else 1, device=device,
                     backend=None if p.backend == "auto" else p.backend)
    try:
        if verb == "train":
            train_rank(cfg, mesh)
        else:
            from evolution.dist_harvest import harvest_share

            harvest_share(cfg, mesh)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    from crosscoders.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:], "evolution.scale"))
