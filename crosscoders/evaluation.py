"""A trained crosscoder on held-out activations: FVU, L0, dead and firing latents, per snapshot (DESIGN.md
"Definitions": FVU = sum|x - x_hat|^2 / sum|x - mean x|^2; L0 = mean active latents per token; dead = never
active over the window)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor

from .model import Crosscoder


def active_latents(f: Tensor) -> Tensor:
    """[batch, d_sae] bool: latent active on the token (in any source, for a per-source code)."""
    active = f > 0
    return active.any(-2) if active.ndim == 3 else active


@torch.no_grad()
def evaluate(model: Crosscoder, batches: Iterable[Tensor], max_batches: int | None = None) -> dict:
    """Per-source FVU = sum|x - x_hat|^2 / sum|x - mean x|^2 over all tokens; L0 = mean active latents per
    token (per-source gate: active in any source); dead_frac = fraction of latents never active.
    `l0_per_source`, `dead_frac_per_source` and `n_features_firing_per_source` (latents with a positive
    activation in that source on some token of the window) count `activations_per_snapshot` > 0, the
    one per-snapshot definition (crosscoders.model)."""
    was = model.training
    model.eval()
    S, H = model.cfg.n_sources, model.cfg.d_sae
    dev = model.W_enc.device
    sse = torch.zeros(S, dtype=torch.float64, device=dev)
    sxx = torch.zeros(S, dtype=torch.float64, device=dev)
    sx = torch.zeros(S, model.cfg.d_in, dtype=torch.float64, device=dev)
    fired = torch.zeros(H, dtype=torch.bool, device=dev)
    fired_s = torch.zeros(S, H, dtype=torch.bool, device=dev)
    l0 = 0.0
    l0_s = torch.zeros(S, dtype=torch.float64, device=dev)
    n = 0
    for x in itertools.islice(batches, max_batches):
        x = x.to(dev, torch.float32)
        x_hat, f = model(x)
        sse += (x - x_hat).double().pow(2).sum((0, 2))
        sx += x.double().sum(0)
        sxx += x.double().pow(2).sum((0, 2))
        active = active_latents(f)
        fired |= active.any(0)
        l0 += active.sum().item()
        fs = model.per_snapshot(f) > 0
        fired_s |= fs.any(0)
        l0_s += fs.sum((0, 2)).double()
        n += x.shape[0]
    model.train(was)
    if n == 0:
        raise ValueError("evaluate() got no batches")
    var = sxx - sx.pow(2).sum(-1) / n  # sum |x - mean|^2
    fvu = (sse / var.clamp(min=1e-12)).tolist()
    return {
        "fvu": fvu,
        "fvu_mean": sum(fvu) / S,
        "l0": l0 / n,
        "dead_frac": 1 - fired.float().mean().item(),
        "l0_per_source": (l0_s / n).tolist(),
        "dead_frac_per_source": (1 - fired_s.float().mean(1)).tolist(),
        "n_features_firing_per_source": fired_s.sum(1).tolist(),
        "n_tokens": n,
    }
