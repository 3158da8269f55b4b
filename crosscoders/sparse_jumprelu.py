"""Sparse training kernels for JumpReLU codes, shared and per-source gate: decode and backpropagate through the
entries that can carry a gradient, keeping the dense encoder forward (the gate reads every pre-activation).

The code is f = pre H(z - theta), z = pre N (shared: one entry per (token b, latent i), N_i = sum_s n_s[i];
per-source: one per (b, s, i), N = n_s[i], pre shared over s). `activations._JumpReLU`'s backward, given
g = dL/df, gives

    dL/dpre   = g H(z - theta) [+ K g pre N]       dL/dtheta = -K g pre       [dL/dN = K g pre]
    K = [|z - theta| < eps / 2] / eps  (the rectangle kernel, Rajamanoharan et al. 2024; [..] with ste_to_input)

so g is read only at the *open* entries (z > theta) and the *window* entries (inside the kernel, open or
not), the sparse set E here. The decoder's g[b, i] = <dL/dx_hat[b], W_dec[:, i]> is nonzero everywhere,
and so is each penalty's dP/df (tanh'(0) = 1), but off E nothing reads them. What reaches W_dec directly:
the decode's sum_b f g_x (f = 0 off the open entries) and the penalty's dP/dN = sum_b dP/d(fN) f (tanh,
tanh_joint, tanh_quad, l1: zero where f = 0), both over E. So the loss and every gradient follow from E:

    pre_E = pre at E (dense values, `sparse._ActivePre`: dL/dW_enc, dL/db_enc over the distinct (b, i))
    f_E   = jumprelu(pre_E, N_E, theta_E) (the same node, elementwise; N_E, theta_E gathered with autograd)
    x_hat = decode over E (`sparse._Decode`; per-source: one table of n_sources d_sae rows, bag (b, s))
    penalty(f_E, N_E): the dense formulas with the zeros of f dropped (`PENALTIES`)

The pre-activation loss (Anthropic Jan 2025) pulls every token of a dead latent, so it stays dense over the
dead columns only (`columns_pre`: one GEMM of their width in the backward). The loss and every gradient equal
the dense path's to float rounding (tests/crosscoders/test_sparse_jumprelu.py). E is found by the kernel's
bound in pre's units, loosened so that it holds every entry the dense backward reads. Entries are counted
on the host (`nonzero`): a sync, free on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from . import activations as A
from .sparse import Active, _ActivePre, _Decode, active

if TYPE_CHECKING:
    from .model import Crosscoder

# Largest fraction of (token, latent) pairs in E at which the sparse step beats the dense one, per gate.
# CPU, measured (`python -m benchmarks.run --only jumprelu`, benchmarks/README.md): loss forward + backward at
# batch 1024 x 8 sources x d_in 128 -> d_sae 4096, sparse / dense speedup at densities 0.018, 0.067, 0.13,
# 0.26: shared gate 3.23, 1.85, 1.31, 0.51; per-source gate (every open pair open in all 8 sources, its
# worst case) 4.79, 1.89, 1.04, 0.44. So sparse up to 1/8 for both. Off the CPU not measured: dense.
CROSSOVER = {("cpu", "shared"): 1 / 8, ("cpu", "per_source"): 1 / 8}


class Code(NamedTuple):
    """The gate's decisions on one batch (no gradient) and the sparse set E in the kernels' two orders."""

    f: Tensor
    """The dense code (metrics; no gradient): [batch, d_sae] or [batch, n_sources, d_sae]."""
    rows: Int[Tensor, " nnz"]
    cols: Int[Tensor, " nnz"]
    srcs: Int[Tensor, " nnz"] | None
    """Per-source gate: each entry's source; None for the shared gate."""
    pair: Int[Tensor, " nnz"] | None
    """Per-source gate: each entry's index among the distinct (token, latent) pairs of `pairs`."""
    pairs: Active
    """The distinct (token, latent) pairs of E: the encoder's entries."""
    entries: Active
    """E as the decoder's entries (per-source: rows b n_sources + s of a table of n_sources d_sae rows)."""
    density: float
    """Distinct (token, latent) pairs of E / (batch d_sae): what `pays` reads."""


@torch.no_grad()
def gate(pre: Float[Tensor, "batch d_sae"], dec_norm: Tensor, threshold: Tensor, bandwidth: float) -> Code:
    """The sparse set E of jumprelu(pre, dec_norm, threshold, bandwidth): every open or window entry, and the
    few just below the window that rounding could put in it (they add nothing). The kernel keeps z = pre N
    with (z - theta) / eps > -0.5, so E is pre > (theta - eps / 2) / N, loosened by 1e-4 of theta + eps:
    one comparison per entry against a [n_sources, d_sae] cut, the code built from E's values alone (the
    per-source code has n_sources d_sae entries per token, each pass over it as long as the encoder's GEMM)."""
    B, H = pre.shape
    th = threshold.to(pre.dtype)  # as the kernel rounds it (bf16 under autocast)
    t = th.to(dec_norm.dtype)
    cut = (t - 0.5 * bandwidth - 1e-4 * (t.abs() + bandwidth)) / dec_norm  # N = 0: +-inf
    f = torch.zeros((B, *dec_norm.shape), dtype=pre.dtype, device=pre.device)
    if dec_norm.ndim == 1:
        rows, cols = (pre > cut).nonzero(as_tuple=True)
        vals = pre[rows, cols]
        f[rows, cols] = vals * (vals * dec_norm[cols] > th[cols]).to(pre.dtype)  # the kernel's open test
        pairs = active(rows, cols, B, H)
        return Code(f, rows, cols, None, None, pairs, pairs, rows.numel() / (B * H))
    S = dec_norm.shape[0]
    rows, srcs, cols = (pre.unsqueeze(-2) > cut).nonzero(as_tuple=True)
    vals = pre[rows, cols]
    f[rows, srcs, cols] = vals * (vals * dec_norm[srcs, cols] > th[cols]).to(pre.dtype)
    # the distinct (token, latent) pairs, in row-major order, from the entries (not a pass over the code)
    keys, pair = torch.unique(rows * H + cols, sorted=True, return_inverse=True)
    pair_rows, pair_cols = keys // H, keys % H
    entries = active(rows * S + srcs, srcs * H + cols, B * S, S * H)
    return Code(f, rows, cols, srcs, pair, active(pair_rows, pair_cols, B, H), entries, pair_rows.numel() / (B * H))


def measured(per_source: bool, device: torch.device | str) -> bool:
    """Whether `CROSSOVER` has a figure for this gate and device (elsewhere the dense path)."""
    return (torch.device(device).type, "per_source" if per_source else "shared") in CROSSOVER


def pays(code: Code, per_source: bool, device: torch.device | str) -> bool:
    """Whether the sparse step beats the dense one for this batch's sparse set (never where not measured)."""
    limit = CROSSOVER.get((torch.device(device).type, "per_source" if per_source else "shared"))
    return limit is not None and code.density <= limit


def forward(model: Crosscoder, x: Float[Tensor, "batch n_sources d_in"], pre: Float[Tensor, "batch d_sae"],
            dec_norm: Tensor, threshold: Tensor, code: Code) -> tuple[Tensor, Tensor, Tensor]:
    """x_hat (with b_dec) and the code's and gate norms' values at E, with the dense path's gradients."""
    cfg = model.cfg
    pre_E = _ActivePre.apply(pre, x.to(model.W_enc.dtype), model.W_enc, model.b_enc, code.pairs)
    if code.srcs is None:
        N_E = dec_norm[code.cols]
    else:
        pre_E, N_E = pre_E[code.pair], dec_norm[code.srcs, code.cols]
    f_E = A.jumprelu(pre_E.to(pre.dtype), N_E, threshold[code.cols], cfg.jumprelu_bandwidth,
                     cfg.jumprelu_ste_to_input)
    S, H, D = model.W_dec.shape
    if code.srcs is None:
        x_hat = _Decode.apply(f_E, model.W_dec, code.entries)
    else:  # each entry decodes into its own source only: one table of S H rows, bags (b, s)
        x_hat = _Decode.apply(f_E, model.W_dec.reshape(1, S * H, D), code.entries).view(-1, S, D)
    return x_hat + model.b_dec, f_E, N_E


def _latent_sum(v: Tensor, index: Tensor, n: int) -> Tensor:
    return v.new_zeros(n).index_add(0, index, v)


def _tanh(f: Tensor, N: Tensor, code: Code, c: float, s: float) -> Tensor:
    S = 1 if code.srcs is None else code.f.shape[1]  # per-source: the mean over sources too
    return torch.tanh(c * f * N).sum() / (code.f.shape[0] * S)


def _tanh_joint(f: Tensor, N: Tensor, code: Code, c: float, s: float) -> Tensor:
    if code.srcs is None:
        return _tanh(f, N, code, c, s)
    z = _latent_sum(f * N, code.pair, code.pairs.rows.numel())  # sum over sources per (token, latent)
    return torch.tanh(c * z).sum() / code.f.shape[0]


def _tanh_quad(f: Tensor, N: Tensor, code: Code, c: float, s: float) -> Tensor:
    n_rows = code.f.shape[0] * (1 if code.srcs is None else code.f.shape[1])
    p = _latent_sum(torch.tanh(c * f * N), code.cols, code.f.shape[-1]) / n_rows
    return (p * (1 + p / s)).sum()


def _l1(f: Tensor, N: Tensor, code: Code, c: float, s: float) -> Tensor:
    return (f * N).sum() / code.f.shape[0]


PENALTIES: dict[str, Callable[[Tensor, Tensor, Code, float, float], Tensor]] = {
    "tanh": _tanh, "tanh_joint": _tanh_joint, "tanh_quad": _tanh_quad, "l1": _l1}
"""`losses.PENALTIES` on one process from the values at E, `(f_E, N_E, code, tanh scale c, frequency scale s)`
(l1_l2's per-source max over sources ties every closed source: dense)."""


class _ColumnsPre(torch.autograd.Function):
    """pre[:, cols] from the dense values already computed, with the gradient to W_enc and b_enc: one GEMM of
    the columns' width in the backward (cols None: every column, the dense encoder's own backward)."""

    @staticmethod
    def forward(ctx, pre: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, cols: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.cols, ctx.shape = cols, W_enc.shape
        return (pre if cols is None else pre[:, cols]).to(W_enc.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        S, D, H = ctx.shape
        grad_W = x.reshape(-1, S * D).T.to(g.dtype) @ g  # [S D, n_cols]
        grad_b = g.sum(0)
        if ctx.cols is not None:
            grad_W = g.new_zeros(S * D, H).index_copy_(1, ctx.cols, grad_W)
            grad_b = g.new_zeros(H).index_copy_(0, ctx.cols, grad_b)
        return None, None, grad_W.view(S, D, H), grad_b, None


def columns_pre(model: Crosscoder, x: Tensor, pre: Tensor, cols: Tensor | None = None) -> Tensor:
    """pre (computed without gradient) at `cols` (None: all), as if computed with it."""
    return _ColumnsPre.apply(pre, x.to(model.W_enc.dtype), model.W_enc, model.b_enc, cols)


def dead_columns(model: Crosscoder, x: Tensor, pre: Tensor, dec_norm: Tensor, threshold: Tensor,
                 dead: Bool[Tensor, " d_sae"]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pre-activation loss's inputs restricted to the dead latents (the only ones it reads)."""
    cols = dead.nonzero().squeeze(1)
    return columns_pre(model, x, pre, cols), dec_norm[..., cols], threshold[cols], dead[cols]
