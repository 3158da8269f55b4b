"""Our BatchTopK training step against a peer: a plain crosscoder loop written from the published loss.

Peer (Lindsey et al. 2024, *Sparse Crosscoders*, in the style of the public replications, e.g.
ckkissane/crosscoder-model-diff-replication): dense einsums, f = ReLU(sum_s x_s W_enc[s] + b_enc),
x_hat_s = f W_dec[:, s] + b_dec[s], loss = sum_s |x_s - x_hat_s|^2 + l1 * sum_i f_i sum_s |W_dec[i, s]|
(batch mean), Adam, gradient clipping at 1. Its parameters are contiguous, so no layout copy slows it.

Ours: what `crosscoders.train` does per batch with activation "batchtopk": `crosscoder_loss` (the sparse
kernels of crosscoders/sparse.py wherever `sparse.pays` says so), backward, clipping, Adam.

The two step on the same batch, interleaved (ours, peer, ours, ...), so a load change on a shared machine
hits both alike; the fastest step of each is kept. FLOPs are what each must do in matmul work:
    peer: 5 x 2 B S D H   (encoder, decoder, code gradient, decoder and encoder weight gradients)
    ours: 2 B S D H + 4 x 2 nnz S D   (dense encoder; the other four over the nnz = k B active entries),
          or 5 x 2 B S D H where the dense path runs,
and `fraction_of_matmul_peak` = FLOPs / step time / the dense fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import time

import torch
from einops import einsum
from torch import Tensor, nn

from crosscoders import sparse
from crosscoders.config import CrosscoderConfig
from crosscoders.losses import crosscoder_loss
from crosscoders.model import Crosscoder

from .common import interleaved_best, matmul_peak, sync
from .train_bench import Shape


class PeerCrosscoder(nn.Module):
    """The replications' crosscoder: W_enc [n_models, d_model, d_hidden], W_dec [d_hidden, n_models, d_model]."""

    def __init__(self, n_models: int, d_model: int, d_hidden: int, dec_init_norm: float = 0.1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_hidden, n_models, d_model, generator=g)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * dec_init_norm
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_hidden))
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_model))

    def loss(self, x: Tensor, l1_coeff: float) -> Tensor:
        acts = torch.relu(einsum(x, self.W_enc, "batch n_models d_model, n_models d_model d_hidden -> batch d_hidden")
                          + self.b_enc)
        x_hat = einsum(acts, self.W_dec, "batch d_hidden, d_hidden n_models d_model -> batch n_models d_model") + self.b_dec
        l2 = (x_hat - x).pow(2).sum((-1, -2)).mean()
        total_decoder_norm = self.W_dec.norm(dim=-1).sum(-1)  # [d_hidden]
        l1 = (acts * total_decoder_norm).sum(-1).mean()
        return l2 + l1_coeff * l1


def _trainer(model: nn.Module, loss_fn, lr: float = 5e-5):
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def peer_case(shape: Shape, k: float = 32, steps: int = 3, device: str = "cpu", peak_n: int | None = None,
              warmup: int = 1) -> dict:
    """Time `steps` interleaved steps of ours (batchtopk, k) and the peer (relu + L1) at one fp32 shape."""
    dev = torch.device(device)
    B, S, D, H = shape.batch, shape.n_sources, shape.d_in, shape.d_sae
    ours = Crosscoder(CrosscoderConfig(n_sources=S, d_in=D, d_sae=H, activation="batchtopk", k=k)).to(dev).train()
    peer = PeerCrosscoder(S, D, H).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, S, D, device=dev, generator=g)
    dead = torch.zeros(H, dtype=torch.bool, device=dev)
    steps_of = {"ours": _trainer(ours, lambda: crosscoder_loss(ours, x, 0.0, dead).total),
                "peer": _trainer(peer, lambda: peer.loss(x, 1e-3))}
    for _ in range(warmup):
        for fn in steps_of.values():
            fn()
    # The peak is measured before and after every round and the best kept, like the steps themselves.
    peak = matmul_peak("fp32", dev, n=peak_n)["gflops"]
    best = {name: float("inf") for name in steps_of}
    for _ in range(steps):
        for name, fn in steps_of.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            best[name] = min(best[name], time.perf_counter() - t0)
        peak = max(peak, matmul_peak("fp32", dev, n=peak_n)["gflops"])
    used_sparse = sparse.pays(k, H, dev)
    unit = 2 * B * S * D * H
    flops = {"peer": 5 * unit, "ours": unit + 4 * 2 * k * B * S * D if used_sparse else 5 * unit}
    out: dict = {"shape": vars(shape), "k": k, "dtype": "fp32", "steps": steps, "sparse_kernels": used_sparse,
                 "matmul_peak_gflops": peak}
    for name, t in best.items():
        gflops = flops[name] / t / 1e9
        out[name] = {"seconds_per_step": t, "tokens_per_s": B / t, "gflops": gflops,
                     "fraction_of_matmul_peak": gflops / peak}
    out["ratio"] = out["ours"]["tokens_per_s"] / out["peer"]["tokens_per_s"]
    return out


def sparse_vs_dense(model: Crosscoder, x: Tensor, coef: float, dev: torch.device, repeats: int) -> tuple[float, float]:
    """(dense, sparse) seconds of one loss forward + backward of `model` on `x`, each kernel path warmed up once,
    then timed interleaved (fastest of `repeats`)."""
    def fwd_bwd(use_sparse: bool) -> None:
        model.zero_grad(set_to_none=True)
        crosscoder_loss(model, x, coef, sparse=use_sparse).total.backward()
    fwd_bwd(True)
    fwd_bwd(False)
    best = interleaved_best({True: lambda: fwd_bwd(True), False: lambda: fwd_bwd(False)}, dev, repeats)
    return best[False], best[True]


def crossover_case(shape: Shape, ks: list[float], repeats: int = 2, device: str = "cpu") -> dict:
    """Loss forward + backward, dense path vs sparse kernels, over k at one shape (interleaved, best of
    `repeats`): where `speedup` crosses 1 is the k / d_sae below which `sparse.pays` should say yes."""
    dev = torch.device(device)
    B, S, D, H = shape.batch, shape.n_sources, shape.d_in, shape.d_sae
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, S, D, device=dev, generator=g)
    rows = []
    for k in ks:
        model = Crosscoder(CrosscoderConfig(n_sources=S, d_in=D, d_sae=H, activation="batchtopk", k=k)).to(dev).train()
        dense_s, sparse_s = sparse_vs_dense(model, x, 0.0, dev, repeats)
        rows.append({"k": k, "k_over_d_sae": k / H, "dense_s": dense_s, "sparse_s": sparse_s,
                     "speedup": dense_s / sparse_s})
    return {"shape": vars(shape), "rows": rows}
