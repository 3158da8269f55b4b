"""`python -m benchmarks.run [--quick] [--only train|peer|harvest|crossover|jumprelu] [--device cuda]`: JSON to stdout and to
`benchmarks/results/<name>.json`. See benchmarks/README.md for what each figure means."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from crosscoders.dataclass_cli import parse_config, to_dict
from crosscoders.io import write_json

from .common import machine, matmul_peak
from .harvest_bench import HarvestShape, harvest_cases, harvest_memory_isolated
from .jumprelu_bench import jumprelu_crossover_case, scheme_step_case
from .peer_bench import crossover_case, peer_case
from .train_bench import Shape, train_case, train_case_isolated

RESULTS = Path(__file__).parent / "results"

# The large shape last: 8 snapshots x d_in 256 x d_sae 16384 at batch 4096.
TRAIN_SHAPES = [Shape(4096, 2, 128, 4096), Shape(4096, 8, 256, 4096), Shape(4096, 8, 256, 16384)]
QUICK_TRAIN_SHAPES = [Shape(256, 2, 16, 64), Shape(256, 4, 32, 128)]
# Ours (batchtopk, k) against the peer loop: the training shapes; the quick ones run dense and sparse.
PEER_SHAPES = TRAIN_SHAPES
QUICK_PEER_SHAPES = [Shape(256, 2, 16, 64), Shape(256, 2, 16, 4096)]
# Dense vs sparse kernels over k / d_sae (`--only crossover`): where sparse.CROSSOVER comes from.
CROSSOVER = [(Shape(4096, 2, 128, 4096), [64, 128, 256, 512]), (Shape(4096, 8, 256, 4096), [128, 256, 512, 1024])]
QUICK_CROSSOVER = [(Shape(256, 2, 16, 512), [4, 64])]
# Sparse JumpReLU (`--only jumprelu`): dense vs sparse per gate over the open fraction (sparse_jumprelu.CROSSOVER),
# then per-source JumpReLU's training step against BatchTopK's at the demo shape (k 16) and the large one (k 32).
JUMPRELU_CROSSOVER = (Shape(1024, 8, 128, 4096), [1 / 64, 1 / 16, 1 / 8, 1 / 4])
JUMPRELU_STEPS = [(Shape(384, 21, 128, 1024), 16.0), (Shape(4096, 8, 256, 16384), 32.0)]
QUICK_JUMPRELU_CROSSOVER = (Shape(64, 3, 8, 256), [1 / 64, 1 / 4])
QUICK_JUMPRELU_STEPS = [(Shape(64, 3, 8, 256), 4.0)]
HARVEST_SHAPE = HarvestShape(n_models=4, d_model=256, n_layers=4, layer=1, n_seq=16, seq_len=128)
# Memory of the two strategies: 8 snapshots of a d_model 512 x 4-layer model (~84 MiB each in fp32).
MEMORY_SHAPE = HarvestShape(n_models=8, d_model=512, n_layers=4, layer=1, n_seq=32, seq_len=128)
QUICK_HARVEST_SHAPE = HarvestShape(n_models=2, d_model=32, n_layers=2, layer=0, n_seq=8, seq_len=16,
                                   d_vocab=64, batch_size=4)


@dataclass
class BenchConfig:
    """Crosscoder training and harvest benchmarks."""

    quick: bool = False
    """Tiny shapes, one step each, no subprocesses: a smoke run in seconds."""
    only: str = ""
    """Run only "train", "peer", "harvest", "crossover" or "jumprelu" ("" = train, peer and harvest)."""
    device: str = ""
    """Torch device ("" = cuda when available, else cpu)."""
    steps: int = 0
    """Timed training steps per case (0 = 3 on CPU, 20 on GPU, 1 with --quick)."""
    dtypes: str = "fp32,bf16"
    """Training dtypes: fp32, bf16 (bf16 = autocast of the matmuls, as TrainConfig.autocast)."""
    activation: str = "relu"
    """Sparsity scheme of the timed crosscoder (relu: the matmuls alone; batchtopk adds its top-k)."""
    k: float = 32.0
    """BatchTopK k of our crosscoder in the comparison with the peer loop."""
    isolate: bool = True
    """Run each training case in its own process (clean CPU peak-RSS figures); off with --quick."""
    name: str = ""
    """Results file name ("" = <device>-<time>[-quick])."""
    results_dir: str = ""
    """Directory of the JSON results ("" = benchmarks/results/, git-ignored)."""


def run(cfg: BenchConfig) -> dict:
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    steps = cfg.steps or (1 if cfg.quick else 20 if dev.type == "cuda" else 3)
    dtypes = [d for d in cfg.dtypes.split(",") if d]
    result: dict = {"config": to_dict(cfg), "machine": {**machine(), "device": device},
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if cfg.only in ("", "train"):
        peak_n = 512 if cfg.quick else None
        peaks = {d: matmul_peak(d, dev, n=peak_n) for d in dtypes}
        cases = []
        for shape in QUICK_TRAIN_SHAPES if cfg.quick else TRAIN_SHAPES:
            for d in dtypes:
                if cfg.isolate and not cfg.quick and dev.type == "cpu":
                    case = train_case_isolated(shape, d, steps, cfg.activation, device, peak_n)
                else:
                    case = train_case(shape, d, steps, cfg.activation, device, peak_n=peak_n)
                cases.append(case)
                print(json.dumps(case), flush=True)
        result["train"] = {"matmul_peak_at_start": peaks, "cases": cases,
                           "flops_counted": "3 x 2 x 2 x batch x n_sources x d_in x d_sae per step"}
    if cfg.only in ("", "peer"):
        cases = []
        for shape in QUICK_PEER_SHAPES if cfg.quick else PEER_SHAPES:
            cases.append(peer_case(shape, cfg.k, steps, device, peak_n=512 if cfg.quick else None))
            print(json.dumps(cases[-1]), flush=True)
        result["peer"] = {"cases": cases, "dtype": "fp32", "ours": "batchtopk (crosscoders.train's step)",
                          "peer": "relu + decoder-norm-weighted L1, dense einsums (benchmarks/peer_bench.py)"}
    if cfg.only == "crossover":
        result["crossover"] = [crossover_case(shape, ks, repeats=1 if cfg.quick else 3, device=device)
                               for shape, ks in (QUICK_CROSSOVER if cfg.quick else CROSSOVER)]
        for case in result["crossover"]:
            print(json.dumps(case), flush=True)
    if cfg.only == "jumprelu":
        shape, rhos = QUICK_JUMPRELU_CROSSOVER if cfg.quick else JUMPRELU_CROSSOVER
        repeats = 1 if cfg.quick else 2
        result["jumprelu_crossover"] = [jumprelu_crossover_case(shape, gate, rhos, repeats, device)
                                        for gate in ("shared", "per_source")]
        result["jumprelu_steps"] = [scheme_step_case(shape, k, repeats, device)
                                    for shape, k in (QUICK_JUMPRELU_STEPS if cfg.quick else JUMPRELU_STEPS)]
        for case in result["jumprelu_crossover"] + result["jumprelu_steps"]:
            print(json.dumps(case), flush=True)
    if cfg.only in ("", "harvest"):
        shape = QUICK_HARVEST_SHAPE if cfg.quick else HARVEST_SHAPE
        result["harvest"] = harvest_cases(shape, device, repeats=1 if cfg.quick else 7)
        if not cfg.quick:
            result["harvest"]["memory"] = [harvest_memory_isolated(MEMORY_SHAPE, lazy, device)
                                           for lazy in (False, True)]
    name = cfg.name or f"{device}-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if cfg.quick else ''}"
    path = Path(cfg.results_dir or RESULTS) / f"{name}.json"
    write_json(path, result)
    result["path"] = str(path)
    return result


def _bare_flags(argv: list[str]) -> list[str]:
    """Allow `--quick` for `--quick true` (configs.py flags always take a value)."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        if a in ("--quick", "--isolate") and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def main(argv: list[str] | None = None) -> dict:
    result = run(parse_config(BenchConfig, _bare_flags(sys.argv[1:] if argv is None else argv)))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
