"""Latent Scaling (Minder et al. 2025, *Overcoming Sparsity Artifacts in Crosscoders*): how much of each
latent each snapshot's activations really carry, whatever its decoder norm there says.

For latent i with activity a_i (its shared code f_i, or with the per-source gate its code in its peak
snapshot) and unit direction u_i (its decoder direction in its peak snapshot), the least-squares scale

    beta[s, i] = argmin_b sum_t |y_ts - b a_ti u_i|^2 = sum_t a_ti <y_ts, u_i> / sum_t a_ti^2

with y = x_s - b_dec[s] ("activation": how much of x_s the latent explains) or y = x_s - x_hat_s + the
latent's own contribution to source s ("error": what the other latents leave to it). beta is in the units
of the decoder norm |W_dec[s, i]| (raw activation units; the model works on raw activations), so a latent
whose norm says "absent" in s (norm < absent_frac x its peak norm) while beta says "present"
(beta >= present_frac x peak norm) is flagged: the L1-style artifacts (Complete Shrinkage) look like that.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from einops import einsum
from torch import Tensor

from .model import Crosscoder


@torch.no_grad()
def latent_scaling(
    model: Crosscoder, batches: Iterable[Tensor], absent_frac: float = 0.2, present_frac: float = 0.5
) -> dict[str, Tensor]:
    """beta_activation, beta_error, norm (raw |W_dec[s, i]|) as [d_sae, n_sources], and `flagged` (bool), on the
    CPU. Computed on the model's device: each batch is moved there (a store hands out CPU batches)."""
    was = model.training
    model.eval()
    dev = model.W_dec.device
    norm = model.W_dec.norm(dim=-1).T.float()  # [H, S] raw units
    peak = norm.argmax(-1)
    H = model.cfg.d_sae
    u = model.W_dec[peak, torch.arange(H, device=dev)].float()  # [H, d_in]
    u = u / u.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    num_act = torch.zeros(model.cfg.n_sources, H, dtype=torch.float64, device=dev)
    num_err = torch.zeros_like(num_act)
    den = torch.zeros(H, dtype=torch.float64, device=dev)
    # <W_dec[s, i], u_i>: the same for every batch (computed per batch it was a W_dec-sized temporary each time)
    dec_along_u = einsum(model.W_dec.float(), u, "s h d, h d -> s h")
    for x in batches:
        x = x.to(dev, torch.float32)
        x_hat, f = model(x)
        a = f[:, peak, torch.arange(H, device=dev)] if f.ndim == 3 else f  # [b, H]
        fs = f if f.ndim == 3 else f[:, None, :]  # the latent's own code per source
        proj_act = einsum(x - model.b_dec, u, "b s d, h d -> b s h")
        # own contribution along u: f[s, i] <W_dec[s, i], u_i>
        own = fs * dec_along_u
        proj_err = einsum(x - x_hat, u, "b s d, h d -> b s h") + own
        num_act += einsum(a, proj_act, "b h, b s h -> s h").double()
        num_err += einsum(a, proj_err, "b h, b s h -> s h").double()
        den += a.double().pow(2).sum(0)
    model.train(was)
    d = den.clamp(min=1e-30)
    beta_act, beta_err = (num_act / d).T.float(), (num_err / d).T.float()
    peak_norm = norm.max(-1, keepdim=True).values.clamp(min=1e-30)
    flagged = (norm < absent_frac * peak_norm) & (beta_act >= present_frac * peak_norm) & (den > 0)[:, None]
    out = {"beta_activation": beta_act, "beta_error": beta_err, "norm": norm, "flagged": flagged}
    return {k: v.cpu() for k, v in out.items()}
