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
from jaxtyping import Bool, Float
from torch import Tensor


def host_sync_is_free(t: Tensor) -> bool:
    """Whether reading a value of `t` on the host (a size from `nonzero`, `.item()`) costs nothing: on the CPU;
    on CUDA it stalls the host until the device catches up, so the training step takes sync-free forms there."""
    return t.device.type == "cpu"


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


class _JumpReLU(torch.autograd.Function):
    """f = pre H(pre N - theta) in one node that keeps only its inputs for the backward and recomputes
    z = pre N and the gate there: the composed form kept z and H(z - theta), two tensors of the code's shape
    ([batch, n_sources, d_sae] under the per-source gate: 6 GiB each at Ge et al.'s [2048, 32, 24576]).
    Gradients are those of `pre * _Step(pre * N, theta)` (tests/crosscoders/test_activations.py)."""

    @staticmethod
    def forward(pre: Tensor, dec_norm: Tensor, threshold: Tensor, bandwidth: float,  # type: ignore[override]
                ste_to_input: bool) -> Tensor:
        return pre * (pre * dec_norm > threshold).to(pre.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        pre, dec_norm, threshold, bandwidth, ste_to_input = inputs
        ctx.save_for_backward(pre, dec_norm, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        pre, dec_norm, threshold = ctx.saved_tensors
        z = pre * dec_norm
        grad_pre = _sum_to(grad_out * (z > threshold).to(grad_out.dtype), pre.shape)
        # the gate's pseudo-gradient (_Step): the rectangle kernel around theta, times what reaches the gate
        ste = (z - threshold).div_(ctx.bandwidth)
        ste = ((ste > -0.5) & (ste < 0.5)).to(grad_out.dtype).div_(ctx.bandwidth).mul_(grad_out).mul_(pre)
        del z
        # elementwise (the sparse kernels' entries, possibly none): theta's gradient is ste itself
        grad_theta = -(ste.reshape(-1, threshold.shape[-1]).sum(0) if ste.ndim > 1 else ste).to(threshold.dtype)
        grad_norm = None
        if ctx.ste_to_input:  # the estimate also reaches z = pre N
            grad_pre = grad_pre + _sum_to(ste * dec_norm, pre.shape)
            grad_norm = _sum_to(ste * pre, dec_norm.shape)
        return grad_pre, grad_norm, grad_theta, None, None


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """`t` summed over the dimensions broadcasting expanded to reach it from `shape`."""
    lead = t.ndim - len(shape)
    dims = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1)
    return t.sum(dims, keepdim=True).reshape(shape) if dims else t


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
    pre in place of theta/N inside the kernel window, where the two agree to O(eps). One autograd node
    (`_JumpReLU`): the gate gives pre > theta/N >= 0 once theta >= 0.
    """
    return _JumpReLU.apply(pre, dec_norm, threshold.to(pre.dtype), bandwidth, ste_to_input)


def jumprelu_composed(pre: Tensor, dec_norm: Tensor, threshold: Tensor, bandwidth: float,
                      ste_to_input: bool = False) -> Tensor:
    """The same function written as `pre * _Step(pre * N, theta)`: the reference `_JumpReLU` is tested against."""
    z = pre * dec_norm
    return pre * _Step.apply(z, threshold.to(z.dtype), bandwidth, ste_to_input)


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
    scored with decoder norms as in Minder et al. 2025): exactly that many, ties at the cut broken by the
    lowest flat index (row-major), so the code is a function of the scores alone, the same on any device
    and any number of data ranks (`losses.batch_topk`). Returns the code and the smallest kept positive
    score, whose running mean becomes the inference threshold."""
    with torch.no_grad():  # relu(pre) * N = relu(pre * N) as N >= 0; the selection carries no gradient
        scores = (pre * dec_norm).clamp_(min=0)
        n_keep = kept_count(k, pre.shape[0], scores.numel())
        values = top_of_batch(scores, n_keep)[0]
        cut = values.min()
        above = scores.flatten() > cut
        keep = above | first_true(scores.flatten() == cut, n_keep - above.sum())
    # the code is relu(pre) at the kept entries (and its gradient flows there only), 0 elsewhere
    return torch.relu(pre) * keep.view_as(pre).to(pre.dtype), min_positive(values)


def kept_count(k: float, batch: int, numel: int) -> int:
    """Entries BatchTopK keeps in a batch of `batch` rows: round(k * batch), at least 1, at most all."""
    return max(1, min(numel, int(round(k * batch))))


def min_positive(values: Tensor) -> Tensor:
    """The smallest positive entry (0 when none), computed on the device: no host sync."""
    m = torch.where(values > 0, values, torch.full_like(values, float("inf"))).min()
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def first_true(mask: Bool[Tensor, " n"], n: Tensor | int, sync_free: bool | None = None) -> Bool[Tensor, " n"]:
    """The first `n` True entries of a flat mask (all of them if fewer; none if n <= 0): the exact tie-break
    at a top-k cut. `n` may be a 0-d tensor. On CUDA (`sync_free`) a cumulative count, no host sync; on the
    CPU (where a sync costs nothing) the True positions, ~5x cheaper than a cumsum over the whole batch.
    Both give the same mask (tests/crosscoders/test_losses.py)."""
    if sync_free is None:
        sync_free = not host_sync_is_free(mask)
    if sync_free:
        return mask & (mask.cumsum(0, dtype=torch.int64) <= n)
    idx = mask.nonzero().squeeze(1)[: max(int(n), 0)]
    return torch.zeros_like(mask).index_fill_(0, idx, True)


def top_of_batch(scores: Float[Tensor, "batch d_sae"], n_keep: int) -> tuple[Tensor, Tensor]:
    """`torch.topk(scores.flatten(), n_keep, sorted=False)` (values, flat indices), ~5x faster on a large
    batch on the CPU: each row's top m (2 n_keep / batch) pooled hold at least n_keep entries, so the n_keep-th
    largest of the pool bounds the n_keep-th largest overall from below, and only entries above it compete.
    Off the CPU plain topk: the filter's `nonzero` would be a host sync, and CUDA's topk is a radix select.
    Which of tied entries the indices name is unspecified (as for torch.topk); the values are exact."""
    flat = scores.flatten()
    m = 2 * -(-n_keep // scores.shape[0])
    if 4 * m > scores.shape[-1] or not host_sync_is_free(flat):  # rows' top m is most of them: nothing to filter
        return torch.topk(flat, n_keep, sorted=False)
    pool = torch.topk(scores, m, dim=-1, sorted=False).values.flatten()
    bound = torch.topk(pool, n_keep, sorted=False).values.min()
    candidates = (flat >= bound).nonzero().squeeze(1)
    top = torch.topk(flat[candidates], n_keep, sorted=False)
    return top.values, candidates[top.indices]
