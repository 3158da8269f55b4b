"""Distributed crosscoder training: data parallel x source (snapshot) parallel, on torch.distributed.

    torchrun --nproc_per_node=8 -m crosscoders.dist_train --store DIR --out DIR --source-parallel 4 [flags]

Source parallel (the model axis). Rank p of a source group holds the per-source tensors of its snapshots
only, W_enc[s] [d_in, d_sae], W_dec[s] [d_sae, d_in], b_dec[s] [d_in] for s in its block, and the
replicated b_enc [d_sae] and threshold [d_sae]:
    pre = sum_p (sum_{s in p} x_s W_enc[s]) + b_enc       one all-reduce [batch, d_sae] per step
    shared gate:     N_i = sum_p sum_{s in p} |W_dec[s, i]|   one all-reduce [d_sae]
    per-source gate: n_s = |W_dec[s, i]|                       local
Per-source losses are local. Memory per rank: (3 n_sources / P) d_in d_sae floats of W_enc, W_dec and
their Adam moments, + 2 d_sae replicated: it falls as 1 / P (the 32 snapshots of Ge et al. 2025 split).

Data parallel (the batch axis). Rank d of a data group reads rows [d B/D, (d+1) B/D) of each global batch
and its gradients are averaged over the data group, so with the same global batch a D-rank run takes the
steps one process takes. Terms that are not a mean over tokens are made global before they are used: the
BatchTopK selection (the k B largest scores over the global batch), the tanh-quad firing frequencies (a
sum over every rank), b_dec's initial mean, the dead-latent counters (a latent fired if it fired on any
rank) and the gradient norm that is clipped.

The loss is `losses.crosscoder_loss(..., mesh=mesh)`, the single-process loss whose collectives act on
this mesh: every rank's loss l_r is chosen so that the global loss is (1/D) sum_r l_r (a term every rank of
a source group computes identically enters l_r divided by P); the replicated parameters' gradients are then
summed over the source group; all gradients are averaged over the data group. This module only shards
the parameters, their gradients and the checkpoints. tests/crosscoders/test_distributed.py checks that 2 and 4 gloo ranks end in single-process training's weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .config import CrosscoderConfig
from .io import torch_save, write_json
from .mesh import Mesh, MeshError
from .model import Crosscoder
from .parallel import Local

SHARDED = ("W_enc", "W_dec", "b_dec", "norm_scale")
"""Per-source tensors (dim 0 = source); every other parameter or buffer is replicated."""


class ShardedCrosscoder(Crosscoder):
    """This rank's block of a crosscoder's sources; `pre_acts` and the shared gate's norms sum over ranks."""

    def __init__(self, cfg: CrosscoderConfig, mesh: Mesh):
        block = mesh.source_slice(cfg.n_sources)
        super().__init__(dataclasses.replace(cfg, n_sources=block.stop - block.start))
        self.full_cfg, self.mesh, self.block = cfg, mesh, block
        full = Crosscoder(cfg)  # the single-process initialisation, sliced: same start as one process
        with torch.no_grad():
            for name, t in full.state_dict().items():
                getattr(self, name).copy_(t[block] if name in SHARDED else t)

    def pre_acts(self, x: Tensor) -> Tensor:
        if self.mesh.source == 1:
            return super().pre_acts(x)
        S, D, H = self.W_enc.shape
        part = x.to(self.W_enc.dtype).reshape(-1, S * D) @ self.W_enc.reshape(S * D, H)
        # Summed in fp32: one process accumulates its single GEMM in fp32 and rounds once; a bf16 all-reduce
        # (under autocast the partial is bf16) would round at every hop of the ring. Each partial is still
        # rounded to bf16 once by its GEMM; the result takes the dtype one process would return.
        return (self.mesh.sum_sources(part.float()) + self.b_enc.float()).to(part.dtype)

    def gate_norms(self) -> Tensor:
        n = self.decoder_norms()
        return n.T if self.per_source else self.mesh.sum_sources(n.sum(-1))


def _state_bytes(state: dict) -> int:
    """Bytes of a checkpoint's model and optimizer tensors (parameters, buffers, Adam moments)."""
    def walk(o):
        if isinstance(o, Tensor):
            yield o.numel() * o.element_size() if o.ndim else 0  # Adam's scalar step counters: not state
        elif isinstance(o, dict):
            for v in o.values():
                yield from walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                yield from walk(v)
    return sum(walk(state["model"])) + sum(walk(state["optimizer"]))


def state_bytes(cfg: dict | CrosscoderConfig, source_parallel: int = 1) -> int:
    """Parameter + Adam-moment bytes (fp32) on one rank: 3 x 4 x (2 n_sources d_in d_sae + n_sources d_in) / P
    + the replicated b_enc, threshold and norm_scale block. Gradients (one more copy of the parameters) and
    activations come on top."""
    c = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    S, D, H = c["n_sources"] // source_parallel, c["d_in"], c["d_sae"]
    sharded = 2 * S * D * H + S * D
    replicated = H + (H if c["activation"] == "jumprelu" else 0)  # b_enc; threshold is a parameter for jumprelu
    buffers = S + (0 if c["activation"] == "jumprelu" else H)  # norm_scale; threshold as a buffer otherwise
    return 4 * (3 * (sharded + replicated) + buffers)


class Distributed(Local):
    """`train`'s hooks for one rank of a Mesh (see the module docstring for the rules)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.is_writer = mesh.rank == 0
        self._reported = False

    def build_model(self, cfg: CrosscoderConfig, device: torch.device) -> Crosscoder:
        return ShardedCrosscoder(cfg, self.mesh).to(device)

    def resume_state(self, state: dict, path: Path) -> dict:
        saved = state.get("parallel") or {"world": 1, "data": 1, "source": 1}
        if saved != self.mesh.layout:
            raise MeshError(f"checkpoint {path} was written by a run of {saved['world']} rank(s) (data "
                            f"{saved['data']} x source {saved['source']}), this one has {self.mesh.world} (data "
                            f"{self.mesh.data} x source {self.mesh.source}): resume with the same layout, or use "
                            "a new out_dir")
        if self.mesh.source_rank:
            shard = path.parent / state["shards"][self.mesh.source_rank]
            try:
                part = torch.load(shard, map_location="cpu", weights_only=True)
            except Exception as e:
                raise MeshError(f"checkpoint {path} names shard {shard.name}, which cannot be read: {e}") from e
            state = {**state, "model": part["model"], "optimizer": part["optimizer"]}
        return state

    def batch_mean(self, x: Tensor) -> Tensor:
        return self.mesh.reduce_(x.sum(0), "data") / (x.shape[0] * self.mesh.data)

    def _replicated(self, name: str) -> bool:
        return name not in SHARDED

    def sync_grads(self, model: Crosscoder) -> None:
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            if self._replicated(name):  # each source rank holds the gradient of its own loss terms
                self.mesh.reduce_(p.grad, "source")
            self.mesh.reduce_(p.grad, "data").div_(self.mesh.data)

    def clip_grad_norm_(self, model: Crosscoder, max_norm: float) -> None:
        """torch.nn.utils.clip_grad_norm_ over the whole (sharded) model: same norm, same coefficient."""
        sq = {True: 0.0, False: 0.0}
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        for n, g in grads:
            sq[self._replicated(n)] = sq[self._replicated(n)] + g.float().pow(2).sum()
        sharded = torch.as_tensor(sq[False], dtype=torch.float32).reshape(1).clone()
        total = (self.mesh.reduce_(sharded, "source")[0] + sq[True]).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for _, g in grads:
            g.mul_(coef.to(g.dtype))

    def any_(self, fired: Tensor) -> Tensor:
        return self.mesh.reduce_(fired.to(torch.int32), "world", dist.ReduceOp.MAX).bool()

    def global_rows(self, n: int) -> int:
        return n * self.mesh.data

    def save_checkpoint(self, path: Path, state: dict) -> None:
        """Each source block's shard first (data rank 0 of each column), then rank 0's state.pt naming
        them, written only once every shard is on disk: state.pt is the commit, a run killed before it
        resumes from the previous complete checkpoint."""
        m = self.mesh
        shard = path.parent / f"shard-source{m.source_rank}-step{state['step']}.pt"
        if m.data_rank == 0 and m.source_rank:
            torch_save(shard, {"model": state["model"], "optimizer": state["optimizer"]})
        if not self._reported:  # what each rank holds, measured once: out_dir/parallel.json
            self._reported = True
            sizes: list = [None] * m.world
            dist.all_gather_object(sizes, _state_bytes(state))
            if self.is_writer:
                write_json(path.parent.parent / "parallel.json",
                           {**m.layout, "state_bytes_per_rank": sizes,
                            "state_bytes_formula": state_bytes(state["train_config"]["crosscoder"], m.source)})
        m.barrier()
        if self.is_writer:
            names = {p: f"shard-source{p}-step{state['step']}.pt" for p in range(1, m.source)}
            torch_save(path, {**state, "parallel": m.layout, "shards": names})
        m.barrier()
        if m.data_rank == 0 and m.source_rank:  # older shards of this block are no longer named by state.pt
            for old in path.parent.glob(f"shard-source{m.source_rank}-step*.pt"):
                if old != shard:
                    old.unlink(missing_ok=True)

    def full_model(self, model: Crosscoder) -> Crosscoder:
        full = Crosscoder(model.full_cfg)
        state = {k: (self.mesh.gather_sources(v) if k in SHARDED else v).detach().cpu()
                 for k, v in model.state_dict().items()}
        full.load_state_dict(state)
        return full.eval()

    def barrier(self) -> None:
        self.mesh.barrier()
