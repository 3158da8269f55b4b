"""Sparse training kernels for top-k codes: decode and backpropagate through the active latents only.

With BatchTopK (Bussmann et al. 2024) a token keeps ~k of d_sae latents: the code f[batch, d_sae] has a
fraction k / d_sae of its entries nonzero (0.2% at k = 32, d_sae = 16384). A dense training step pays for
five [batch, n_sources d_in] x [n_sources d_in, d_sae] matmuls (encoder forward, decoder forward, the
code's gradient, the decoder's and the encoder's weight gradients). Only the encoder forward needs every
latent, since the top-k selection reads all pre-activations; the other four touch active entries (b, i) only:

    x_hat[b, s]        = sum_{i active in b} f[b, i] W_dec[s, i]                      decode
    dL/df[b, i]        = sum_s <dL/dx_hat[b, s], W_dec[s, i]>          (b, i) active   sampled dot products
    dL/dW_dec[s, i]    = sum_{b: i active in b} f[b, i] dL/dx_hat[b, s]               per latent
    dL/dW_enc[s, :, i] = sum_{b: i active in b} dL/dpre[b, i] x[b, s]                 per latent

at ~nnz n_sources d_in multiply-adds each instead of batch d_sae n_sources d_in. Gao et al. 2024 (*Scaling
and evaluating sparse autoencoders*) train TopK autoencoders with kernels of this kind; sparsify decodes
with `embedding_bag` (`utils.eager_decode`) and index-adds the encoder's gradient (`fused_encoder.py`).
Here all four are `embedding_bag` sums (a fused gather-scale-sum, on CPU and CUDA, that never materialises
the [nnz, d_in] gathered rows: on CPU that is ~10x faster than index_select / index_add_), the decoder
rows-by-token and both weight gradients latent-by-latent, over the sources stacked into one table.
AuxK's reconstruction from the top-k_aux dead latents (Gao et al. 2024) goes through the same kernels
(`decode_topk`). The loss and every gradient equal the dense path's to float rounding
(tests/crosscoders/test_sparse.py); `losses.crosscoder_loss` switches to them for batchtopk (whose gate is shared)
where `pays` says they are faster. JumpReLU, either gate, goes through the same kernels (sparse_jumprelu.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from .model import Crosscoder

# Largest k / d_sae at which the sparse step is faster than the dense one, per device type. CPU: measured
# (`python -m benchmarks.run --only crossover`, benchmarks/README.md): loss forward + backward at batch
# 4096, sparse / dense speedup at k / d_sae = 1/64, 1/32, 1/16, 1/8: 1.27, 1.18, 0.96, 0.82 for 2 x 128
# -> 4096 and -, 1.51, 1.29, 0.87 for 8 x 256 -> 4096; so sparse from 1/32 down. CUDA: an estimate, not
# measured: fp32 GEMMs at ~50 TFLOP/s against gathers at ~2 TB/s put the break-even near 1/100.
CROSSOVER = {"cpu": 1 / 32, "cuda": 1 / 128}


def pays(k: float, d_sae: int, device: torch.device | str) -> bool:
    """Whether the sparse kernels beat the dense matmuls for this mean L0 `k` and dictionary size."""
    return k / d_sae <= CROSSOVER.get(torch.device(device).type, 0.0)


class Active(NamedTuple):
    """The nonzero entries of a code [n_rows, d_sae]: sorted by row (token), and again by latent."""

    rows: Int[Tensor, " nnz"]
    cols: Int[Tensor, " nnz"]
    row_starts: Int[Tensor, " n_rows"]
    """Where each row's entries start (embedding_bag offsets over tokens)."""
    by_col: Int[Tensor, " nnz"]
    """Permutation that sorts the entries by latent (stable, so rows stay sorted within a latent)."""
    rows_by_col: Int[Tensor, " nnz"]
    cols_by_col: Int[Tensor, " nnz"]
    col_starts: Int[Tensor, " d_sae"]
    """Where each latent's entries start, in `by_col` order."""
    n_rows: int
    d_sae: int


def active(rows: Int[Tensor, " nnz"], cols: Int[Tensor, " nnz"], n_rows: int, d_sae: int) -> Active:
    """Index both orders of the entries (rows must be sorted, as `nonzero()` gives them)."""
    rows, cols = rows.contiguous(), cols.contiguous()  # nonzero's columns are strided: sort is 100x slower
    by_col = torch.argsort(cols, stable=True)
    cols_by_col = cols[by_col]
    row_starts = torch.searchsorted(rows, torch.arange(n_rows, device=rows.device))
    col_starts = torch.searchsorted(cols_by_col, torch.arange(d_sae, device=cols.device))
    return Active(rows, cols, row_starts, by_col, rows[by_col], cols_by_col, col_starts, n_rows, d_sae)


def _stacked(index: Tensor, starts: Tensor, n_table: int, n_sources: int) -> tuple[Tensor, Tensor]:
    """Indices and bag offsets of one embedding_bag over n_sources tables stacked into [n_sources * n_table]:
    source s reads rows s * n_table + index and fills bags s * n_bags + j."""
    s = torch.arange(n_sources, device=index.device)[:, None]
    return (index + s * n_table).flatten(), (starts + s * index.numel()).flatten()


def _bag_sum(table: Float[Tensor, "n_sources n_table d"], index: Tensor, starts: Tensor,
             weights: Float[Tensor, " nnz"]) -> Float[Tensor, "n_sources n_bags d"]:
    """out[s, j] = sum over bag j's entries e of weights[e] * table[s, index[e]], for every source s."""
    S, T, D = table.shape
    idx, offsets = _stacked(index, starts, T, S)
    out = torch.nn.functional.embedding_bag(idx, table.reshape(S * T, D), offsets, mode="sum",
                                            per_sample_weights=weights.to(table.dtype).repeat(S))
    return out.view(S, starts.numel(), D)


def latent_sum(values: Float[Tensor, " nnz"], act: Active) -> Float[Tensor, " d_sae"]:
    """out[i] = sum of `values` over latent i's entries. `index_add_` is the obvious form, but on CUDA it adds
    with atomics in an order that changes from run to run: not bitwise reproducible, so an exact resume
    would drift. An embedding_bag over the entries in latent order (a table of one 1) sums each latent's bag
    in sequence on every device; on the CPU these are index_add_'s additions in index_add_'s order (a
    latent's entries by ascending row), so the result is bitwise the same (tests/crosscoders/test_sparse.py)."""
    one = values.new_ones(1, 1, 1)
    return _bag_sum(one, torch.zeros_like(act.rows_by_col), act.col_starts, values[act.by_col])[0, :, 0]


class _ActivePre(torch.autograd.Function):
    """pre[b, i] = sum_s <x[b, s], W_enc[s, :, i]> + b_enc[i] at the active entries. The values come from
    the dense encoder forward already done (the top-k needed all of them); the backward reads only them."""

    @staticmethod
    def forward(ctx, pre: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, act: Active) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.act = act
        return pre[act.rows, act.cols].to(W_enc.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        act: Active = ctx.act
        # dL/dW_enc[s, :, i] = sum_b g[b, i] x[b, s]: bags are latents, the table is x per source.
        x_s = x.transpose(0, 1).contiguous()  # [n_sources, batch, d_in]
        grad_W = _bag_sum(x_s, act.rows_by_col, act.col_starts, g[act.by_col])  # [S, d_sae, d_in]
        grad_b = latent_sum(g, act)
        # A transposed view: autograd's AccumulateGrad lays it out like W_enc in its one copy.
        return None, None, grad_W.transpose(1, 2), grad_b, None


class _Decode(torch.autograd.Function):
    """x_hat[b, s] = sum_{i active in b} f[b, i] W_dec[s, i] (no bias), and its gradients."""

    @staticmethod
    def forward(ctx, vals: Tensor, W_dec: Tensor, act: Active) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(vals, W_dec)
        ctx.act = act
        return _bag_sum(W_dec, act.cols, act.row_starts, vals).transpose(0, 1)  # [n_rows, S, d_in]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        vals, W_dec = ctx.saved_tensors
        act: Active = ctx.act
        S, H, D = W_dec.shape
        g_s = grad.to(W_dec.dtype).transpose(0, 1).contiguous()  # [S, n_rows, d_in]
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            # dL/df[b, i] = sum_s <g[b, s], W_dec[s, i]>: the fused kernel autograd uses for embedding_bag's
            # per_sample_weights (bag of entry e = its token, stacked over sources). Entries in latent order
            # read W_dec once, in sequence, and only g (batch x d_in, cache-sized) at random: 2x faster.
            idx, offsets = _stacked(act.cols_by_col, act.col_starts, H, S)
            bag = (act.rows_by_col + act.n_rows * torch.arange(S, device=vals.device)[:, None]).flatten()
            by_col = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g_s.view(S * act.n_rows, D), W_dec.reshape(S * H, D), idx, offsets, bag, 0, -1)
            grad_vals = torch.empty_like(vals).index_copy_(0, act.by_col, by_col.view(S, -1).sum(0).to(vals.dtype))
        if ctx.needs_input_grad[1]:
            # dL/dW_dec[s, i] = sum_b f[b, i] g[b, s]: bags are latents, the table is g per source.
            grad_W = _bag_sum(g_s, act.rows_by_col, act.col_starts, vals[act.by_col])
        return grad_vals, grad_W, None


def sparse_decode(model: Crosscoder, x: Float[Tensor, "batch n_sources d_in"], pre: Float[Tensor, "batch d_sae"],
                  rows: Int[Tensor, " nnz"], cols: Int[Tensor, " nnz"],
                  use: Bool[Tensor, " nnz"] | None = None) -> Float[Tensor, "batch n_sources d_in"]:
    """W_dec^T f with f = pre at the given entries (each with pre > 0, rows sorted) and 0 elsewhere, no
    bias; gradients reach W_enc, b_enc (through pre) and W_dec from those entries only. `pre` is the dense
    encoder output computed without gradient. `use`: entries to count (False: padding, value and gradient 0),
    so that the number of entries can be fixed in advance instead of read from the device."""
    act = active(rows, cols, x.shape[0], model.cfg.d_sae)
    vals = _ActivePre.apply(pre, x.to(model.W_enc.dtype), model.W_enc, model.b_enc, act)
    if use is not None:
        vals = vals * use.to(vals.dtype)
    return _Decode.apply(vals, model.W_dec, act)


def decode_code(model: Crosscoder, x: Float[Tensor, "batch n_sources d_in"], pre: Float[Tensor, "batch d_sae"],
                f: Float[Tensor, "batch d_sae"], max_nnz: int | None = None) -> Float[Tensor, "batch n_sources d_in"]:
    """`model.decode(f)` for a top-k code f = relu(pre) * mask (computed without gradient), with the
    gradients the dense path would give: where f > 0, df/dpre = 1; elsewhere f and its gradient are 0.
    `max_nnz`: a bound on f's nonzeros known on the host (BatchTopK keeps exactly k B entries); the entries
    are then found by `nonzero_static` and padded, with no host sync (`nonzero` has to read its size)."""
    if max_nnz is None:
        rows, cols = f.nonzero(as_tuple=True)
        return sparse_decode(model, x, pre, rows, cols) + model.b_dec
    B, H = f.shape
    # padding after the real entries (nonzero_static keeps them first, in row order), at the last position
    idx = torch.nonzero_static(f.flatten(), size=max_nnz, fill_value=B * H - 1).squeeze(1)
    real = torch.arange(max_nnz, device=f.device) < (f != 0).sum()
    return sparse_decode(model, x, pre, idx // H, idx % H, real) + model.b_dec


def decode_topk(model: Crosscoder, x: Float[Tensor, "batch n_sources d_in"], pre: Float[Tensor, "batch d_sae"],
                indices: Int[Tensor, "batch k"], use: Bool[Tensor, "batch k"] | None = None,
                ) -> Float[Tensor, "batch n_sources d_in"]:
    """W_dec^T relu(pre) over `indices` per token (AuxK's reconstruction, no bias), over the entries `use`
    (default all); entries with pre <= 0 give nothing and no gradient, as in the dense form. They are masked,
    not dropped: dropping them would make the number of entries a host sync."""
    rows = torch.arange(x.shape[0], device=pre.device)[:, None].expand_as(indices)
    keep = pre.gather(1, indices) > 0
    if use is not None:
        keep = keep & use
    return sparse_decode(model, x, pre, rows.flatten(), indices.flatten(), keep.flatten())
