"""Zero-disk streaming throughput as a ratio to its parts, measured in the same run.

    python -m benchmarks.stream_bench [--quick] [--device cuda] [--name NAME]

Three cases over the same tokens, interleaved (a, b, c, a, b, c, ...), fastest of `repeats` kept:
  bare_forward  `model(tokens, stop_at_layer=L+1)` under no_grad for every snapshot, every window: the
                forward passes any harvest or stream must do;
  train_memory  `crosscoders.train.train` on the same number of batches already in memory (the
                crosscoder steps, their checkpoint and the final save);
  train_stream  `train` on a `crosscoders.stream.ShuffleStream` over those tokens: forwards, hook capture,
                BOS exclusion, the shuffle buffer and the steps, no disk.
`ratio` = (bare_forward + train_memory) / train_stream: 1.0 means streaming costs nothing beyond the
forward passes and the crosscoder steps it cannot avoid; below 1, the capture and the buffer's overhead.
JSON to stdout and to benchmarks/results/<name>.json.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from crosscoders.config import CrosscoderConfig, TrainConfig
from crosscoders.dataclass_cli import parse_config, to_dict
from crosscoders.io import write_json
from crosscoders.stream import ShuffleStream
from crosscoders.train import train

from .common import interleaved_best, machine
from .harvest_bench import HarvestShape, neox_like

RESULTS = Path(__file__).parent / "results"


@dataclass
class StreamBenchConfig:
    """Streaming throughput against the bare forward passes plus the crosscoder steps."""

    quick: bool = False
    """Tiny shapes, one repeat: a smoke run in seconds."""
    device: str = ""
    """Torch device ("" = cuda when available, else cpu)."""
    n_models: int = 4
    """Snapshots (sources)."""
    d_model: int = 256
    """Width of each snapshot (d_in of the crosscoder)."""
    n_layers: int = 4
    """Layers of each snapshot (the hook is blocks.1: the forward stops after layer 1)."""
    seq_len: int = 128
    """Tokens per sequence."""
    buffer_seqs: int = 16
    """Sequences per shuffle window."""
    windows: int = 2
    """Windows streamed (each window = buffer_seqs sequences through every snapshot)."""
    batch_size: int = 508
    """Crosscoder batch (rows); a window of 16 x 127 kept tokens = 4 batches."""
    d_sae: int = 1024
    """Crosscoder latents."""
    repeats: int = 3
    """Timed rounds (the fastest of each case is kept)."""
    name: str = ""
    """Results file name ("" = stream-<device>-<time>[-quick])."""
    results_dir: str = ""
    """Directory of the JSON results ("" = benchmarks/results/, git-ignored)."""


QUICK = dict(n_models=2, d_model=32, n_layers=2, seq_len=16, buffer_seqs=4, windows=2, batch_size=30, d_sae=64,
             repeats=1)


def run(cfg: StreamBenchConfig) -> dict:
    if cfg.quick:
        cfg = StreamBenchConfig(**{**to_dict(cfg), **QUICK})
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    shape = HarvestShape(cfg.n_models, cfg.d_model, cfg.n_layers, 1, cfg.buffer_seqs * cfg.windows, cfg.seq_len,
                         d_vocab=512 if cfg.quick else 8192, batch_size=32)
    models = [neox_like(shape, s, dev) for s in range(cfg.n_models)]
    tokens = torch.randint(1, shape.d_vocab, (shape.n_seq, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    hook = "blocks.1.hook_resid_post"
    stream = ShuffleStream(models, tokens, hook, cfg.batch_size, buffer_seqs=cfg.buffer_seqs, scales=None)
    steps = sum(stream._plan(0)[1])
    tcfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, progress=False, device=device, autocast="none",
                       checkpoint_every=10**9, log_every=10**9,
                       crosscoder=CrosscoderConfig(n_sources=cfg.n_models, d_in=cfg.d_model, d_sae=cfg.d_sae,
                                                   activation="batchtopk", k=32 if not cfg.quick else 4))
    in_memory = list(itertools.islice(stream(0), steps))

    @torch.no_grad()
    def bare() -> None:
        for m in models:
            for i in range(0, shape.n_seq, 32):
                m(tokens[i:i + 32].to(dev), stop_at_layer=2)

    def trained(batches) -> None:
        with tempfile.TemporaryDirectory() as d:
            train(tcfg, batches, Path(d))

    cases = {"bare_forward": bare, "train_memory": lambda: trained(in_memory),
             "train_stream": lambda: trained(ShuffleStream(models, tokens, hook, cfg.batch_size,
                                                           buffer_seqs=cfg.buffer_seqs, scales=None))}
    for fn in cases.values():  # warm-up
        fn()
    best = interleaved_best(cases, dev, cfg.repeats)
    n_tok = steps * cfg.batch_size
    result = {"config": to_dict(cfg), "machine": {**machine(), "device": device},
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": steps, "tokens": n_tok,
              "seconds": {k: round(v, 4) for k, v in best.items()},
              "tokens_per_s": {k: round(n_tok / v, 1) for k, v in best.items()},
              "ratio": round((best["bare_forward"] + best["train_memory"]) / best["train_stream"], 4)}
    return result


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(StreamBenchConfig, sys.argv[1:] if argv is None else argv)
    result = run(cfg)
    name = cfg.name or f"stream-{result['machine']['device']}-{time.strftime('%Y%m%d-%H%M%S')}" + \
        ("-quick" if cfg.quick else "")
    path = Path(cfg.results_dir or RESULTS) / f"{name}.json"
    write_json(path, result)
    result["path"] = str(path)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
