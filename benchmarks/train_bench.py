"""Crosscoder training throughput (tokens/s), peak memory, and achieved GFLOP/s as a fraction of the
dense-matmul peak for the same dtype, measured in the same run.

A step is what `crosscoders.train` does per batch: `crosscoder_loss` forward, backward, gradient
clipping, Adam step (bf16 = `torch.autocast` of the matmuls, as `TrainConfig.autocast="bf16"`).
FLOPs counted: the encoder and decoder matmuls only, forward + backward (backward = 2 x forward):
    3 x 2 (enc, dec) x 2 (multiply-add) x batch x n_sources x d_in x d_sae.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from crosscoders.config import CrosscoderConfig
from crosscoders.losses import crosscoder_loss
from crosscoders.model import Crosscoder

from .common import PeakMemory, matmul_peak, sync


@dataclass
class Shape:
    batch: int
    n_sources: int
    d_in: int
    d_sae: int

    def flops_per_step(self) -> float:
        return 3 * 2 * 2 * self.batch * self.n_sources * self.d_in * self.d_sae


def train_case(shape: Shape, dtype: str, steps: int, activation: str = "relu", device: str = "cpu",
               warmup: int = 1, peak_n: int | None = None) -> dict:
    """Time `steps` training steps (after `warmup` untimed ones) of one shape and dtype."""
    dev = torch.device(device)
    with PeakMemory(dev) as mem:
        cfg = CrosscoderConfig(n_sources=shape.n_sources, d_in=shape.d_in, d_sae=shape.d_sae,
                               activation=activation, k=32)
        model = Crosscoder(cfg).to(dev).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(shape.batch, shape.n_sources, shape.d_in, device=dev, generator=g)
        dead = torch.zeros(shape.d_sae, dtype=torch.bool, device=dev)

        def step() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = crosscoder_loss(model, x, 1e-3, dead)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        for _ in range(warmup):
            step()
        # The peak is measured right before and after the timed steps, in the same process, and the
        # better of the two kept: on a shared machine a peak taken minutes earlier is not comparable.
        peak = matmul_peak(dtype, dev, n=peak_n)["gflops"]
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(dev)
        seconds = time.perf_counter() - t0
        peak = max(peak, matmul_peak(dtype, dev, n=peak_n)["gflops"])
    gflops = shape.flops_per_step() * steps / seconds / 1e9
    return {"shape": vars(shape), "dtype": dtype, "activation": activation, "steps": steps,
            "seconds_per_step": seconds / steps, "tokens_per_s": shape.batch * steps / seconds,
            "gflops": gflops, "matmul_peak_gflops": peak, "fraction_of_matmul_peak": gflops / peak,
            "memory": mem.as_dict()}


def train_case_isolated(shape: Shape, dtype: str, steps: int, activation: str, device: str,
                        peak_n: int | None = None) -> dict:
    """`train_case` in a fresh process, so that the CPU peak-RSS figure belongs to this case alone."""
    args = json.dumps({"shape": vars(shape), "dtype": dtype, "steps": steps, "activation": activation,
                       "device": device, "peak_n": peak_n})
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_bench", args], capture_output=True, text=True)
    if out.returncode:
        return {"shape": vars(shape), "dtype": dtype, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    print(json.dumps(train_case(Shape(**a["shape"]), a["dtype"], a["steps"], a["activation"], a["device"],
                                peak_n=a["peak_n"])))
