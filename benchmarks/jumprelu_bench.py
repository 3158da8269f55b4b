"""Sparse JumpReLU kernels (crosscoders/sparse_jumprelu.py): where they pay, and a JumpReLU step against BatchTopK's.

`jumprelu_crossover_case`: loss forward + backward, dense path against sparse kernels, for each gate over
densities of the sparse set E (open + threshold-window entries); `sparse_jumprelu.CROSSOVER` comes from
where `speedup` crosses 1. `scheme_step_case`: what `crosscoders.train` does per batch (loss, backward,
clipping, Adam) for per-source JumpReLU and for BatchTopK at a comparable L0, interleaved, fastest kept.

A random-init crosscoder has no trained thresholds: each latent's threshold is set to the quantile of its
z = pre N over the batch (and sources) that opens a fraction `rho` of its entries, and the kernel width to
5% of z's spread, so that the window holds a few percent of entries as in training.
"""

from __future__ import annotations

import dataclasses

import torch

from crosscoders import sparse_jumprelu as SJ
from crosscoders.config import CrosscoderConfig
from crosscoders.losses import crosscoder_loss
from crosscoders.model import Crosscoder

from .common import interleaved_best
from .peer_bench import _trainer, sparse_vs_dense
from .train_bench import Shape


def jumprelu_model(shape: Shape, gate: str, rho: float, x: torch.Tensor) -> Crosscoder:
    """A JumpReLU crosscoder whose gate opens a fraction `rho` of its entries on `x`."""
    cfg = CrosscoderConfig(n_sources=shape.n_sources, d_in=shape.d_in, d_sae=shape.d_sae, activation="jumprelu",
                           gate=gate)
    model = Crosscoder(cfg).to(x.device).train()
    with torch.no_grad():
        z = (model.gate_input(model.pre_acts(x)) * model.gate_norms()).reshape(-1, shape.d_sae)
        n = z.shape[0]
        model.threshold.copy_(z.kthvalue(max(1, min(n, round(n * (1 - rho)))), dim=0).values.clamp(min=0))
        bandwidth = 0.05 * z.std().item()
    model.cfg = dataclasses.replace(cfg, jumprelu_bandwidth=bandwidth)
    return model


def _code(model: Crosscoder, x: torch.Tensor) -> SJ.Code:
    with torch.no_grad():
        return SJ.gate(model.pre_acts(x), model.gate_norms(), model.threshold.clamp(min=0),
                       model.cfg.jumprelu_bandwidth)


def jumprelu_crossover_case(shape: Shape, gate: str, rhos: list[float], repeats: int = 2,
                            device: str = "cpu") -> dict:
    """Dense against sparse loss forward + backward (tanh_joint, the default) at each open fraction `rho`."""
    dev = torch.device(device)
    x = torch.randn(shape.batch, shape.n_sources, shape.d_in, device=dev,
                    generator=torch.Generator(device=dev).manual_seed(0))
    rows = []
    for rho in rhos:
        model = jumprelu_model(shape, gate, rho, x)
        code = _code(model, x)
        dense_s, sparse_s = sparse_vs_dense(model, x, 1.0, dev, repeats)
        rows.append({"rho": rho, "density": code.density, "entries_per_token": code.rows.numel() / shape.batch,
                     "open_per_token": float((code.f != 0).sum()) / shape.batch,
                     "dense_s": dense_s, "sparse_s": sparse_s, "speedup": dense_s / sparse_s})
    return {"shape": vars(shape), "gate": gate, "rows": rows}


def scheme_step_case(shape: Shape, k: float, repeats: int = 2, device: str = "cpu") -> dict:
    """Training steps of per-source JumpReLU (sparse where it pays) and BatchTopK (k) at the same shape, the
    JumpReLU gate opening about k latents per token; interleaved, fastest of `repeats` after one warm-up."""
    dev = torch.device(device)
    x = torch.randn(shape.batch, shape.n_sources, shape.d_in, device=dev,
                    generator=torch.Generator(device=dev).manual_seed(0))
    jump = jumprelu_model(shape, "per_source", k / shape.d_sae, x)
    code = _code(jump, x)
    topk = Crosscoder(CrosscoderConfig(n_sources=shape.n_sources, d_in=shape.d_in, d_sae=shape.d_sae,
                                       activation="batchtopk", k=k)).to(dev).train()
    dead = torch.zeros(shape.d_sae, dtype=torch.bool, device=dev)
    steps = {"jumprelu_per_source": _trainer(jump, lambda: crosscoder_loss(jump, x, 1.0, dead, pre_act_coef=0.01).total),
             "batchtopk": _trainer(topk, lambda: crosscoder_loss(topk, x, 0.0, dead).total)}
    for fn in steps.values():
        fn()
    best = interleaved_best(steps, dev, repeats)
    f = code.f != 0
    return {"shape": vars(shape), "k": k, "dtype": "fp32", "repeats": repeats,
            "jumprelu_sparse_kernels": SJ.pays(code, True, dev),
            "jumprelu_l0": float(f.any(1).sum()) / shape.batch, "jumprelu_l0_entries": float(f.sum()) / shape.batch,
            "jumprelu_sparse_set_per_token": code.rows.numel() / shape.batch,
            "seconds_per_step": best, "jumprelu_over_batchtopk": best["jumprelu_per_source"] / best["batchtopk"]}
