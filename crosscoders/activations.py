"""Sparsifying activation functions of a crosscoder, as plain functions of the pre-activation.

All three schemes share one code `f[batch, d_sae]` across sources. JumpReLU and BatchTopK decide
*which* latents fire on the decoder-norm-scaled pre-activation `z_i = pre_i * N_i` with
`N_i = sum_s |W_dec[s, i]|` (Lindsey et al. 2024 weight the penalty by N_i; Minder et al. 2025
select BatchTopK on f_i * N_i): that makes the choice invariant to moving scale between a latent's
encoder and decoder. At inference both are a threshold gate `f_i = pre_i * [pre_i N_i > theta_i]`,
which is also what sae-lens' `JumpReLUSAE` computes (with threshold theta_i / N_i).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


def relu(pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
    return torch.relu(pre)


class _Step(torch.autograd.Function):
    """Heaviside H(z - theta) whose gradient w.r.t. theta is a rectangle-kernel density estimate.

    Rajamanoharan et al. 2024 (JumpReLU SAEs), eq. 11: d/dtheta H(z - theta) ~ -(1/eps) K((z - theta)/eps)
    with K the unit rectangle. With `ste_to_input` the same estimate (negated) also reaches z, so the
    encoder and decoder norms learn where the gate sits (Anthropic, Jan 2025 update; sae-lens
    `jumprelu_ste_to_input=True`); without it (DeepMind) they learn through the open gate only.
    """

    @staticmethod
    def forward(z: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool) -> Tensor:  # type: ignore[override]
        return (z > threshold).to(z.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        z, threshold, bandwidth, ste_to_input = inputs
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor, None, None]:  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        u = (z - threshold) / ctx.bandwidth
        ste = ((u > -0.5) & (u < 0.5)).to(grad_out.dtype) / ctx.bandwidth * grad_out
        grad_theta = -ste.reshape(-1, threshold.shape[-1]).sum(0)
        return (ste if ctx.ste_to_input else None), grad_theta.to(threshold.dtype), None, None


def jumprelu(
    pre: Float[Tensor, "... d_sae"],
    dec_norm: Float[Tensor, " d_sae"],
    threshold: Float[Tensor, " d_sae"],
    bandwidth: float,
    ste_to_input: bool = False,
) -> Float[Tensor, "... d_sae"]:
    """f = pre * H(pre * N - theta), with the KDE pseudo-gradient for theta.

    With z = pre N the latent's output in decoder-norm units is z H(z - theta), whose theta-gradient at
    z = theta is -(theta/eps) K (Rajamanoharan et al. 2024); ours is that divided by N, evaluated with
    pre in place of theta/N inside the kernel window, where the two agree to O(eps).
    """
    z = pre * dec_norm
    gate = _Step.apply(z, threshold.to(z.dtype), bandwidth, ste_to_input)
    return pre * gate  # gate implies pre > theta/N >= 0 once theta >= 0


def threshold_gate(
    pre: Float[Tensor, "... d_sae"],
    dec_norm: Float[Tensor, " d_sae"],
    threshold: Float[Tensor, " d_sae"],
) -> Float[Tensor, "... d_sae"]:
    """Inference form of jumprelu and batchtopk: relu(pre) where pre * N > theta (no gradient to theta)."""
    return torch.relu(pre) * (pre * dec_norm > threshold).to(pre.dtype)


def batch_topk(
    pre: Float[Tensor, "batch d_sae"],
    dec_norm: Float[Tensor, " d_sae"],
    k: float,
) -> tuple[Float[Tensor, "batch d_sae"], Tensor]:
    """Keep the `k * batch` largest `relu(pre) * N` over the whole batch (Bussmann et al. 2024, BatchTopK;
    scored with decoder norms as in Minder et al. 2025). Returns the code and the smallest kept score,
    whose running mean becomes the inference threshold."""
    acts = torch.relu(pre)
    scores = (acts * dec_norm).flatten()
    n_keep = max(1, min(scores.numel(), int(round(k * pre.shape[0]))))
    top = torch.topk(scores.detach(), n_keep, sorted=False)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, top.indices, True).view_as(acts)
    kept = top.values[top.values > 0]
    min_kept = kept.min() if kept.numel() else scores.new_zeros(())
    return acts * mask.to(acts.dtype), min_kept
