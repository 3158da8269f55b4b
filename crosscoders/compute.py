"""Where the study's analysis stages compute (evaluate, geometry, interventions): on their model's device.

The device is the model's (`model_device`), which the run's config put there (`[harvest] device` for the
snapshot loaders, `[geometry] device`), never assumed. On CUDA the logit statistics run in fp32 with TF32
matmuls allowed inside the stage only (`tf32`: the flag is restored after, so a caller's choice survives);
on the CPU they keep fp64 (`stat_dtype`), the reference the tests pin to 1e-10 and which costs a CPU about
twice fp32, where a GPU's fp64 units run at 1/2 (H100) to 1/64 (consumer cards) of its fp32 rate. Statistics
that need fp64 on any device (least squares near R² = 1, distances by the ‖x‖² + ‖y‖² − 2x·y expansion)
say so where they are computed and run in fp64 on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def model_device(model) -> torch.device:
    """The device `model`'s parameters live on (CPU for a parameterless callable)."""
    params = getattr(model, "parameters", None)
    p = next(params(), None) if params is not None else None
    return p.device if p is not None else torch.device("cpu")


def stat_dtype(device: str | torch.device) -> torch.dtype:
    """Precision of the per-token logit statistics on `device`: fp64 on the CPU, fp32 elsewhere."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


@contextmanager
def tf32(device: str | torch.device) -> Iterator[None]:
    """TF32 matmuls on a CUDA `device` within the block (about 8x fp32's rate on tensor cores, 10-bit
    mantissa inputs, fp32 accumulation); the previous setting is restored after. Elsewhere a no-op."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def release_memory(device: str | torch.device = "cpu") -> None:
    """Hand memory freed by a dropped snapshot back: on the CPU glibc keeps freed heap pages (a Pythia-160M load
    left 0.2-0.5 GiB resident after its model was dropped, and the peak grew by 0.3 GiB over 8 snapshots;
    `malloc_trim` returns them), on CUDA the caching allocator keeps freed blocks for the next snapshot's
    differently shaped tensors (`empty_cache`)."""
    import ctypes
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
