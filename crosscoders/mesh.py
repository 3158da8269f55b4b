"""The process mesh of a distributed crosscoder run: data parallel x source (snapshot) parallel.

`torchrun --nproc_per_node=W ...` starts W ranks; `Mesh.init(source_parallel=P)` lays them out as a
D x P grid (D = W / P), rank = d * P + p: the P ranks of one *source group* hold disjoint snapshots of the
same tokens, the D ranks of one *data group* hold the same snapshots of disjoint tokens. Source groups are
contiguous ranks, so on a multi-GPU node their all-reduces (one per step for the pre-activation) stay on
the fastest links. Backend: NCCL where the device is CUDA, gloo on the CPU (PyTorch's own; no process
pool of ours). Collectives with autograd (`all_reduce_sum`) carry the gradient across ranks: the
backward of a sum over ranks is the sum over ranks of the upstream gradients.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import UserError


class MeshError(UserError, ValueError):
    """A distributed layout that cannot work (sizes that do not divide, a resume on another layout)."""


DEFAULT_TIMEOUT_S = 3 * 3600.0
"""How long a collective (a barrier included) waits for the slowest rank before the job fails. Generous: at
Pythia scale rank 0 alone merges and verifies ~150 GB of harvested shards while the other ranks wait in a
barrier; at a few hundred MB/s of disk and sha256 that is tens of minutes, and torch's usual 10 minutes
(NCCL) killed the job there. A dead rank is still noticed at once: torchrun ends the job when a process exits."""


def check_device(device: str | torch.device, ranks: int = 1) -> torch.device:
    """The device `device` names, refused with one clear error if this machine has no such device or fewer
    GPUs than `ranks` (one GPU per rank): before any model runs, not as a CUDA error deep in the first step."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device {device!r} is not a torch device ({e}): use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type != "cuda":
        if ranks > 1 and dev.type != "cpu":
            raise UserError(f"{ranks} ranks on device {device!r}: distributed runs use 'cuda' (one GPU per rank) or 'cpu'")
        return dev
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise UserError(f"device {device!r} but this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                        "False): set device = 'cpu', or run where a GPU is visible (CUDA_VISIBLE_DEVICES)")
    if dev.index is not None and dev.index >= n:
        raise UserError(f"device {device!r} but this machine has {n} CUDA GPU(s) (cuda:0 .. cuda:{n - 1})")
    if ranks > n:
        raise UserError(f"{ranks} ranks on device {device!r} but this machine has {n} CUDA GPU(s): one rank per GPU; "
                        f"set [parallel] nproc_per_node = {n} (or \"auto\")")
    return dev


def resolve_nproc(nproc: int | str, device: str | torch.device) -> int:
    """Ranks per node: "auto" = one per visible GPU where `device` is CUDA, else 1; a number is checked against
    the GPUs there are (`check_device`)."""
    if nproc == "auto":
        check_device(device)  # "auto" on a CUDA device with no GPU: the same clear error
        return torch.cuda.device_count() if torch.device(device).type == "cuda" else 1
    n = int(nproc)
    if n < 1:
        raise UserError(f"nproc_per_node must be >= 1 or \"auto\", got {nproc!r}")
    check_device(device, n)
    return n


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclass
class Mesh:
    """This rank's place in the D x P grid, and the process groups of its row and column."""

    rank: int
    world: int
    data: int
    """D: ranks that split the batch (tokens)."""
    source: int
    """P: ranks that split the sources (snapshots)."""
    data_rank: int
    source_rank: int
    data_group: Any = None
    source_group: Any = None
    device: str = "cpu"

    @classmethod
    def single(cls, device: str = "cpu") -> Mesh:
        """One process: a 1 x 1 grid, every collective a no-op (the loss and the loop take this by default)."""
        return cls(0, 1, 1, 1, 0, 0, device=device)

    @classmethod
    def init(cls, source_parallel: int = 1, device: str = "cpu", backend: str | None = None,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> Mesh:
        """Join the torch.distributed job started by torchrun (env:// rendezvous) and build the groups. On CUDA
        each rank takes `cuda:{LOCAL_RANK}` (the mesh's `device`); a device this node lacks, or more ranks on it
        than GPUs, is one clear error before the process group starts."""
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        cuda = torch.device(device).type == "cuda"
        if cuda:
            check_device(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
            device = f"cuda:{local_rank}"
        if not dist.is_initialized():
            if "RANK" not in os.environ:
                raise MeshError("no torch.distributed job: launch with `torchrun --nproc_per_node=N -m ...`")
            backend = backend or ("nccl" if cuda else "gloo")
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        world, rank = dist.get_world_size(), dist.get_rank()
        P = int(source_parallel)
        if P < 1 or world % P:
            raise MeshError(f"source_parallel={P} does not divide the world size {world} "
                            f"(torchrun --nproc_per_node): choose a divisor of {world}")
        D = world // P
        d, p = divmod(rank, P)
        mesh = cls(rank, world, D, P, d, p, device=str(device))
        # every rank must create every group, in the same order (torch.distributed.new_group)
        for dd in range(D):
            g = dist.new_group([dd * P + pp for pp in range(P)])
            if dd == d:
                mesh.source_group = g
        for pp in range(P):
            g = dist.new_group([dd * P + pp for dd in range(D)])
            if pp == p:
                mesh.data_group = g
        return mesh

    @property
    def layout(self) -> dict:
        return {"world": self.world, "data": self.data, "source": self.source}

    def source_slice(self, n_sources: int) -> slice:
        """This rank's snapshots: a contiguous block of n_sources / P (n_sources must divide: padding would
        train dummy snapshots whose decoder norms enter the shared gate)."""
        if n_sources % self.source:
            raise MeshError(f"{n_sources} sources do not split over source_parallel={self.source} ranks: "
                            f"choose a source_parallel that divides {n_sources}")
        n = n_sources // self.source
        return slice(self.source_rank * n, (self.source_rank + 1) * n)

    # ---------------------------------------------------------------- collectives (no-ops on size-1 groups)
    def sum_sources(self, t: Tensor) -> Tensor:
        """Sum over the source group, with autograd."""
        return _AllReduceSum.apply(t, self.source_group) if self.source > 1 else t

    def sum_world(self, t: Tensor) -> Tensor:
        """Sum over every rank, with autograd."""
        return _AllReduceSum.apply(t, None) if self.world > 1 else t

    def reduce_(self, t: Tensor, group: str, op: Any = dist.ReduceOp.SUM) -> Tensor:
        """In-place all-reduce without autograd over "data", "source" or "world"."""
        size = {"data": self.data, "source": self.source, "world": self.world}[group]
        if size > 1:
            dist.all_reduce(t, op=op, group={"data": self.data_group, "source": self.source_group}.get(group))
        return t

    def gather_data(self, t: Tensor) -> Tensor:
        """Concatenate equal-sized tensors of the data group along dim 0."""
        if self.data == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.data)]
        dist.all_gather(parts, t.contiguous(), group=self.data_group)
        return torch.cat(parts)

    def gather_sources(self, t: Tensor) -> Tensor:
        """Concatenate each source rank's block of a per-source tensor along dim 0 (source order)."""
        if self.source == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.source)]
        dist.all_gather(parts, t.contiguous(), group=self.source_group)
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
