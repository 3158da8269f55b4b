"""Which precision to compute in, decided by measurement on the device at hand, never by habit.

bf16 autocast halves memory traffic and, where the hardware has bf16 units (CUDA since Ampere; CPUs with
AMX or AVX-512-BF16), runs matmuls several times faster. Elsewhere it is emulated: on a 2-core AVX2-only
AMD EPYC a 2048² bf16 matmul ran at 0.3 GFLOP/s against 105 GFLOP/s in fp32 (DESIGN.md, measured).
`autocast = "auto"` therefore picks bf16 only where a short probe (bf16 vs fp32 matmul time, cached per
process and device) says it is faster, and an explicit "bf16" where it is slow warns with the ratio.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from functools import cache
from typing import Literal

import torch

Autocast = Literal["auto", "none", "bf16"]
# bf16 must be at least this much faster than fp32 for "auto" to choose it (a margin over timing noise).
MIN_SPEEDUP = 1.2
AUTO_ENV = "CROSSCODERS_AUTO_PRECISION"
"""Set to "fp32" or "bf16" to pin what "auto" resolves to, without the probe, in this process and the ones it
starts (torchrun ranks): the probe's verdict can flip between processes where the speed-up is near
MIN_SPEEDUP (1.4-2.5x measured on one AMD EPYC with AVX-512-BF16, by thread count), and runs that must agree
bit for bit across processes need one precision. The tests pin fp32 (tests/conftest.py)."""


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@cache
def bf16_speedup(device: str = "cpu") -> float:
    """fp32 time / bf16 time of one square matmul on `device` (> 1: bf16 is faster). Cached per process.

    The probe is sized so that emulated bf16 on a CPU costs ~0.1 s once; on CUDA it is synchronised."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return 0.0
    n = 256 if dev.type == "cpu" else 2048
    g = torch.Generator().manual_seed(0)
    a32, b32 = (torch.randn(n, n, generator=g).to(dev) for _ in range(2))
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run(a, b):
        return lambda: (a @ b, sync())

    t32 = _time(run(a32, b32), 5)
    t16 = _time(run(a16, b16), 2 if dev.type == "cpu" else 5)
    return t32 / max(t16, 1e-9)


def resolve_autocast(mode: str, device: str | torch.device = "cpu") -> Literal["none", "bf16"]:
    """"auto" → "bf16" where the probe measures it ≥ MIN_SPEEDUP× faster, else "none" (fp32).
    An explicit "bf16" is kept, with a warning where it measures slower than fp32."""
    if mode not in ("auto", "none", "bf16"):
        raise ValueError(f"autocast must be 'auto', 'none' or 'bf16', got {mode!r}")
    if mode == "none":
        return "none"
    pinned = os.environ.get(AUTO_ENV)
    if mode == "auto" and pinned:
        if pinned not in ("fp32", "bf16"):
            raise ValueError(f"{AUTO_ENV}={pinned!r}: use fp32 or bf16 (or unset it to measure)")
        return "bf16" if pinned == "bf16" else "none"
    dev = str(torch.device(device))
    speedup = bf16_speedup(dev)
    if mode == "bf16":
        if speedup < 1.0:
            ratio = f"{1 / speedup:.0f}× slower" if speedup > 0 else "unsupported"
            warnings.warn(f"autocast='bf16' on {dev}: a bf16 matmul measured {ratio} than fp32 here "
                          "(no bf16 units: AMX / AVX-512-BF16 on CPU); use autocast='auto' or 'none'", stacklevel=2)
        return "bf16"
    return "bf16" if speedup >= MIN_SPEEDUP else "none"


def describe(mode: str, resolved: str, device: str | torch.device = "cpu") -> dict:
    """What was chosen and why, for logs and run records."""
    out = {"autocast": mode, "precision": "bf16" if resolved == "bf16" else "fp32", "device": str(device)}
    if mode == "auto" and os.environ.get(AUTO_ENV):
        out["pinned_by"] = f"{AUTO_ENV}={os.environ[AUTO_ENV]}"
    elif mode != "none":
        out["bf16_speedup_measured"] = round(bf16_speedup(str(torch.device(device))), 3)
    return out


def autocast_context(resolved: str, device: str | torch.device):
    """torch.autocast to bf16 for `resolved == "bf16"`, else a no-op context."""
    if resolved == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
