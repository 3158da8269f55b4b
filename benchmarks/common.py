"""Timing, the dense-matmul peak, and peak memory: the yardsticks every benchmark reports against."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Fastest of `repeats` timed calls (seconds) after `warmup` untimed ones: the least disturbed run
    on a shared machine."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved_best(cases: dict, device: torch.device, repeats: int) -> dict:
    """Fastest time (seconds) of each case over `repeats` rounds, every round running all cases in turn: on a
    shared machine load drifts, and cases compared with each other should see the same conditions. No
    warm-up (callers warm up what needs it)."""
    best = {k: float("inf") for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def matmul_peak(dtype: str, device: torch.device, n: int | None = None, repeats: int = 5) -> dict:
    """Dense matmul throughput `[n, n] @ [n, n]` in GFLOP/s (2 n^3 FLOPs), the machine's practical peak
    for `dtype` measured in this run, so fractions of it are comparable across machines and loads."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device, generator=g).to(DTYPES[dtype])
    t = best_time(lambda: a @ b, device, repeats=repeats, warmup=2)
    return {"dtype": dtype, "n": n, "seconds": t, "gflops": 2 * n**3 / t / 1e9}


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPU; on CPU the process's peak RSS (whole process,
    so run one case per process for a clean figure; `delta` is relative to the RSS on entry)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = current_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss()

    def as_dict(self) -> dict:
        kind = "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss"
        return {"kind": kind, "peak_mib": self.peak / 2**20, "delta_mib": (self.peak - self.start) / 2**20}


def peak_rss() -> int:
    """This address space's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux keeps that across fork + exec, so a
    child process (the isolated cases, the dry run's stages) would report the RSS of the parent that spawned it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def machine() -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(), **cpu_info()}
    if dev == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# CPU features that decide fp32 vs bf16 matmul speed (AVX2-only machines emulate bf16, ~300x slower).
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info() -> dict:
    """CPU model, logical CPUs and the matmul-relevant flags, from /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name", ""), "cpu_count": text.count("processor\t:"),
            "cpu_flags": [f for f in _CPU_FLAGS if f in flags]}
