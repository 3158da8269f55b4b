"""Training objective of a crosscoder: reconstruction summed over sources + the scheme's penalties.

Each penalty is a plain function; `crosscoder_loss` picks them by `cfg.activation`:
  relu      : L1 of f weighted by N_i = sum_s |W_dec[s, i]| (Lindsey et al. 2024, eq. for crosscoders)
  jumprelu  : sum_i tanh(c f_i N_i) (Anthropic Jan 2025 update; Ge et al. 2025; `tanh_joint`), optional pre-act loss
  batchtopk : no penalty (sparsity is the top-k); AuxK on dead latents (Gao et al. 2024; Minder et al. 2025); the
              reconstruction from the top k / 4 alone (`nested_topk_mse`, TrainConfig.nested_k_frac)
With the per-source gate (Ge et al. 2025) the code is f[s, i] and each penalty is summed over latents and
sources with that source's decoder norm, sum_s sum_i pen(f[s, i] |W_dec[s, i]|); with the shared gate
f_i * sum_s |W_dec[s, i]| is the one term per latent. Exceptions, the schemes' defaults: l1_l2 and tanh_joint
take one term per latent for a per-source code too, so that splitting a feature over snapshots costs.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
from einops import einsum
from jaxtyping import Bool, Float
from torch import Tensor

from . import activations as A
from . import sparse as S
from . import sparse_jumprelu as SJ
from .mesh import Mesh
from .model import Crosscoder


class LossOutput(NamedTuple):
    total: Tensor
    """The scalar minimised: mse + coef * sparsity + aux."""
    mse: Tensor
    """sum_s |x_s - x_hat_s|^2, mean over the batch."""
    sparsity: Tensor
    """The scheme's sparsity penalty before its coefficient (0 for batchtopk)."""
    aux: Tensor
    """Auxiliary loss for dead latents, coefficient applied (AuxK or pre-activation loss)."""
    mse_per_source: Tensor
    """|x_s - x_hat_s|^2 per source, mean over the batch, detached: [n_sources]."""
    f: Tensor
    """The code [batch, d_sae] (shared gate) or [batch, n_sources, d_sae] (per-source gate), for metrics."""
    x_hat: Tensor
    """The reconstruction [batch, n_sources, d_in]."""
    min_kept: Tensor | None
    """batchtopk: smallest kept decoder-norm-scaled activation (feeds the inference threshold)."""
    nested: Tensor | None = None
    """batchtopk: the nested top-k reconstruction term, coefficient applied (`nested_topk_mse`); else None."""


def _shared_share(value: Tensor, mesh: Mesh) -> Tensor:
    """A term every rank of a source group computes identically enters each rank's loss divided by P, so
    that the replicated parameters' gradients, summed over the source group, are the global ones."""
    return value / mesh.source


# Each penalty is this rank's share of the global one (`crosscoder_loss`'s rule: sums over sources stay local,
# terms every source rank computes identically are divided by P); with the default mesh (one process) every
# collective is a no-op and it is the plain formula.
_ONE = Mesh.single()


def l1_penalty(f: Tensor, dec_norm: Tensor, mesh: Mesh = _ONE) -> Tensor:
    """sum over latents (and sources, per-source gate) of f * norm, mean over the batch."""
    value = (f * dec_norm).flatten(1).sum(-1).mean()
    return value if f.ndim == 3 else _shared_share(value, mesh)  # per-source: a sum over this rank's sources


def l1_l2_penalty(f: Tensor, dec_norms: Float[Tensor, "d_sae n_sources"], mesh: Mesh = _ONE) -> Tensor:
    """sum_i f_i * ||(|W_dec[s, i]|)_s||_2: L1 on the code times the L2 norm of the decoder concatenated over
    sources (Lindsey et al. 2024 discuss both this and the sum of norms). Splitting one feature into latents
    that each cover some sources costs more than one shared latent (sum_s n_s >= ||n||_2), and the penalty's
    pull on n_s is proportional to n_s, so it shrinks a decoder's profile over sources without reshaping it
    (the sum's pull is the same in every source, which flattens the profile's low end and moves its argmax
    once splitting starts). Per-source code [batch, n_sources, d_sae]: the largest code over sources.
    On ranks the squared norms are summed over the source group, and the largest code is owned by the
    rank(s) holding it (ties split evenly, as torch.amax's gradient does)."""
    norm = mesh.sum_sources(dec_norms.pow(2).sum(-1)).sqrt()  # [d_sae], over all sources
    if f.ndim == 2:
        return _shared_share((f * norm).sum(-1).mean(), mesh)
    local = f.amax(-2)
    if mesh.source == 1:
        return (local * norm).sum(-1).mean()
    top = mesh.reduce_(local.detach().clone(), "source", dist.ReduceOp.MAX)
    owner = (local.detach() == top).float()
    ties = mesh.reduce_(owner.clone(), "source")
    return (local * owner / ties * norm).sum(-1).mean()


def tanh_penalty(f: Tensor, dec_norm: Tensor, c: float, mesh: Mesh = _ONE) -> Tensor:
    """sum_i tanh(c f_i N_i), mean over the batch: a smooth L0 proxy that, unlike L1, does not shrink the
    active latents' magnitudes. Per-source code [batch, n_sources, d_sae]: also the mean over sources
    (OpenMOSS reduces its per-head penalty so), so a latent open in every source costs what one shared-gate
    latent costs, and a per-source coefficient means what a shared one does (on ranks: the mean over this
    rank's equal block, divided by P)."""
    return _shared_share(torch.tanh(c * f * dec_norm).sum(-1).mean(), mesh)


def tanh_joint_penalty(f: Tensor, dec_norm: Tensor, c: float, mesh: Mesh = _ONE) -> Tensor:
    """sum_i tanh(c sum_s f[s, i] |W_dec[s, i]|), mean over the batch: one soft L0 term per latent, of what it
    writes summed over sources (jumprelu's default). Shared code: the same as `tanh_penalty` (f_i N_i).
    Per-source code: a latent open in any source pays about once, so splitting one feature over latents that
    each cover some snapshots costs more than one latent open in all of them. With the per-source mean of
    `tanh_penalty` (OpenMOSS) a latent open in k of S sources pays k / S, the same as k single-source latents:
    on planted data features then split by snapshot (one latent for the faint birth snapshot, another for
    the rest), and 0.72-0.93 of them were recovered against 0.97-1.00 with this penalty (tests/crosscoders/test_recovery.py).
    On ranks the sum over sources spans the source group."""
    z = mesh.sum_sources((f * dec_norm).sum(-2)) if f.ndim == 3 else f * dec_norm
    return _shared_share(torch.tanh(c * z).sum(-1).mean(), mesh)


def tanh_quad_penalty(f: Tensor, dec_norm: Tensor, c: float, frequency_scale: float, mesh: Mesh = _ONE) -> Tensor:
    """Ge et al. 2025 (OpenMOSS `sparsity_loss_type="tanh-quad"`): sum_i p_i (1 + p_i / s), with p_i the mean
    over the batch (and sources) of tanh(c f_i N_i), a soft firing frequency; the quadratic term penalises
    latents that fire often (dense latents) more than linearly, s = `frequency_scale`. On ranks p_i is the
    frequency over the global batch and every source."""
    t = torch.tanh(c * f * dec_norm).reshape(-1, f.shape[-1])
    p = mesh.sum_world(t.sum(0)) / (t.shape[0] * mesh.world)
    return _shared_share((p * (1 + p / frequency_scale)).sum(), mesh)


PENALTIES = {
    "l1": lambda f, n, model, c, s, mesh: l1_penalty(f, n, mesh),
    "l1_l2": lambda f, n, model, c, s, mesh: l1_l2_penalty(f, model.decoder_norms().float(), mesh),
    "tanh": lambda f, n, model, c, s, mesh: tanh_penalty(f, n, c, mesh),
    "tanh_joint": lambda f, n, model, c, s, mesh: tanh_joint_penalty(f, n, c, mesh),
    "tanh_quad": lambda f, n, model, c, s, mesh: tanh_quad_penalty(f, n, c, s, mesh),
}
"""Sparsity penalties by name, each `(code, gate norms, model, tanh scale c, frequency scale s, mesh) -> this
rank's share` (l1_l2 reads the per-source decoder norms from the model)."""


def penalty_name(activation: str, sparsity: str) -> str | None:
    """The penalty a scheme trains with: `sparsity`, or for "auto" the scheme's own (relu: l1_l2, jumprelu:
    tanh_joint, batchtopk: None). One place for the defaults."""
    if sparsity != "auto" and sparsity not in PENALTIES:
        raise ValueError(f"unknown sparsity penalty {sparsity!r}; choose one of auto, {', '.join(PENALTIES)}")
    return {"relu": "l1_l2", "jumprelu": "tanh_joint"}.get(activation) if sparsity == "auto" else sparsity


def batch_topk(pre: Tensor, dec_norm: Tensor, k: float, mesh: Mesh) -> tuple[Tensor, Tensor]:
    """`activations.batch_topk` over the global batch: on one data rank exactly that; on D data ranks keep the
    k B_global largest relu(pre) N over all of them, exactly that many, ties at the cut broken by the lowest
    flat index of the global batch (rank d holds its rows d B/D ...), as one process breaks them. Each rank
    sends its own top k B_global scores (their union holds the global top) and its counts above and at the
    cut; no host sync."""
    if mesh.data == 1:
        return A.batch_topk(pre, dec_norm, k)
    with torch.no_grad():
        scores = (pre * dec_norm).clamp_(min=0).flatten()
        n_keep = A.kept_count(k, pre.shape[0] * mesh.data, scores.numel() * mesh.data)
        local = torch.topk(scores, min(n_keep, scores.numel()), sorted=False).values
        values = torch.topk(mesh.gather_data(local), n_keep, sorted=False).values  # the global top n_keep
        cut = values.min()
        above, tie = scores > cut, scores == cut
        counts = mesh.gather_data(torch.stack([above.sum(), tie.sum()])).view(mesh.data, 2)
        # ties go to the lowest global indices: this rank takes what is left after every rank's entries
        # above the cut and the ties of the ranks before it
        left = n_keep - counts[:, 0].sum() - counts[: mesh.data_rank, 1].sum()
        keep = above | A.first_true(tie, left)
    return torch.relu(pre) * keep.view_as(pre).to(pre.dtype), A.min_positive(values)


def pre_act_loss(pre: Tensor, dec_norm: Tensor, threshold: Tensor, dead: Bool[Tensor, " d_sae"]) -> Tensor:
    """Anthropic Jan 2025: sum_i ReLU(theta_i - pre_i N_i) over dead latents pulls them back to their gate
    (per-source gate: pre [batch, 1, d_sae] against each source's norms [n_sources, d_sae])."""
    gap = torch.relu(threshold - pre * dec_norm) * dead.to(pre.dtype)
    return gap.flatten(1).sum(-1).mean()


def auxk_loss(
    model: Crosscoder,
    x: Float[Tensor, "batch n_sources d_in"],
    x_hat: Float[Tensor, "batch n_sources d_in"],
    pre: Float[Tensor, "batch d_sae"],
    dec_norm: Float[Tensor, " d_sae"],
    dead: Bool[Tensor, " d_sae"],
    k_aux: int,
    sparse: bool = False,
) -> Tensor:
    """AuxK (Gao et al. 2024, App. A.2): the top-k_aux dead latents per token reconstruct the residual of
    the live ones, with W_dec and no bias; scaled down when fewer than k_aux latents are dead. `sparse`:
    through the selected latents only (`pre` then carries no gradient; sparse.py gives the same one).
    The number of dead latents stays on the device (no host sync): the top k_aux are taken whatever it is,
    and those that are not dead (fewer than k_aux dead) are masked out of the reconstruction."""
    if A.host_sync_is_free(dead) and not dead.any():
        return pre.new_zeros(())  # nothing dead: skip the work where asking costs nothing (the CPU)
    k = min(k_aux, pre.shape[-1])
    residual = (x - x_hat).detach()
    scores = (torch.relu(pre) * dec_norm).masked_fill(~dead, -1.0)
    top = torch.topk(scores, k, dim=-1)
    use = dead[top.indices]
    if sparse:
        recon = S.decode_topk(model, x, pre, top.indices, use)
    else:
        vals = torch.relu(pre).gather(-1, top.indices) * use.to(pre.dtype)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, vals)
        recon = einsum(acts.to(model.W_dec.dtype), model.W_dec, "b h, s h d -> b s d")
    scale = (dead.sum() / k_aux).clamp(max=1.0)
    return scale * (recon - residual).pow(2).sum((-1, -2)).mean()


def nested_topk_mse(x: Tensor, x_nested: Tensor) -> Tensor:
    """sum_s |x_s - x_hat_s|^2 (mean over the batch) of the reconstruction from the top `nested_k_frac * k` entries
    of the BatchTopK code alone. Gao et al. 2024's Multi-TopK (L(k) + L(4k) / 8) and HierarchicalTopK (Balagansky
    et al. 2025) reconstruct from several budgets of one code; here a smaller one: the strongest latents of a
    token must explain it without the rest. Where k exceeds the true L0, BatchTopK finds degenerate solutions
    (Chanin & Garriga-Alonso 2025, *Sparse but Wrong*): one latent firing for either of two features and a
    second latent correcting it, two slots per feature; the nested term charges them."""
    return (x_nested.float() - x.float()).pow(2).sum(-1).mean(0).sum()


def crosscoder_loss(
    model: Crosscoder,
    x: Float[Tensor, "batch n_sources d_in"],
    sparsity_coef: float,
    dead: Bool[Tensor, " d_sae"] | None = None,
    auxk_coef: float = 1 / 32,
    k_aux: int = 0,
    pre_act_coef: float = 0.0,
    sparse: bool | None = None,
    sparsity: str = "auto",
    frequency_scale: float = 0.01,
    nested_k_frac: float = 0.0,
    nested_k_coef: float = 1.0,
    mesh: Mesh | None = None,
) -> LossOutput:
    """One forward pass in training mode and the loss of `model.cfg.activation`'s scheme.

    `sparsity` (relu, jumprelu): "auto" = the scheme's own penalty (relu: l1_l2, jumprelu: tanh_joint), or "l1",
    "l1_l2", "tanh", "tanh_joint", "tanh_quad" (Ge et al. 2025, with `frequency_scale`); batchtopk has none, and with
    `nested_k_frac` > 0 adds `nested_k_coef` x `nested_topk_mse` of the top `nested_k_frac * k` (0 = off).

    `sparse` (batchtopk, jumprelu): decode and backpropagate through the active latents only (crosscoders/sparse.py;
    jumprelu, either gate, through its open and threshold-window entries: crosscoders/sparse_jumprelu.py, every
    penalty but l1_l2): the same loss and gradients, faster when the code is sparse; None = where it pays
    (`sparse.pays` on k / d_sae; jumprelu: `sparse_jumprelu.pays` on each batch's entries). The returned code
    `f` then carries no gradient.

    `mesh`: this rank's place in a distributed run (crosscoders/mesh.py; `model` its `ShardedCrosscoder`, whose
    pre-activations and shared-gate norms already sum over the source group). The result is this rank's share
    l_r, chosen so that the global loss is (1/D) sum_r l_r: sums over sources (mse, the per-source l1) stay
    local; terms every rank of a source group computes identically enter divided by P; the BatchTopK cut and
    tanh-quad's frequencies are taken over the global batch. None = one process, where every collective is a
    no-op and each term is the plain one (tests/crosscoders/test_distributed.py: 2 and 4 gloo ranks end in the
    single-process weights)."""
    cfg = model.cfg
    mesh = mesh or Mesh.single()
    model.check_input(x)
    penalty = penalty_name(cfg.activation, sparsity)
    # the sparse kernels decode this process's whole code: one rank only
    # jumprelu: the sparse set is counted on the host, so `sparse=None` tries it only where that is free
    jump = (cfg.activation == "jumprelu" and mesh.world == 1 and model.training and penalty in SJ.PENALTIES
            and (sparse is True or (sparse is None and SJ.measured(model.per_source, x.device)
                                    and A.host_sync_is_free(x))))
    jump_forced = sparse is True
    if sparse is None:
        sparse = S.pays(cfg.k, cfg.d_sae, x.device)
    sparse = sparse and cfg.activation == "batchtopk" and not model.per_source and mesh.world == 1
    with torch.no_grad() if sparse or jump else contextlib.nullcontext():
        pre = model.pre_acts(x)
    with torch.no_grad() if sparse else contextlib.nullcontext():
        dec_norm = model.gate_norms()  # [d_sae] shared, [n_sources, d_sae] per-source
    code = None
    if jump:  # jumprelu: the gate's entries decide, batch by batch, whether the sparse step pays
        th = model.threshold.clamp(min=0)
        code = SJ.gate(pre, dec_norm, th, cfg.jumprelu_bandwidth)
        if not (jump_forced or SJ.pays(code, model.per_source, x.device)):
            pre, code = SJ.columns_pre(model, x, pre), None  # the dense path, from the pre already computed
    min_kept = None
    if cfg.activation == "batchtopk":
        f, min_kept = batch_topk(pre, dec_norm, cfg.k, mesh)
    else:
        f = model.activate(pre) if code is None else code.f
    # BatchTopK keeps exactly this many entries: the sparse kernels find them without a host sync
    n_keep = A.kept_count(cfg.k, x.shape[0], x.shape[0] * cfg.d_sae)
    if code is not None:
        x_hat, f_E, N_E = SJ.forward(model, x, pre, dec_norm, th, code)
    else:
        x_hat = S.decode_code(model, x, pre, f, n_keep) if sparse else model.decode(f)
    err = (x_hat.float() - x.float()).pow(2).sum(-1)  # [batch, n_sources]
    mse_per_source = err.mean(0)
    mse = mse_per_source.sum()
    zero = mse.new_zeros(())
    aux = zero
    sparsity = zero  # from here on the penalty's value
    up = torch.promote_types(f.dtype, torch.float32)  # penalties in fp32 at least (fp64 stays fp64)
    if code is not None:
        sparsity = SJ.PENALTIES[penalty](f_E.to(up), N_E.to(up), code, cfg.tanh_scale, frequency_scale)
    elif cfg.activation != "batchtopk":
        sparsity = PENALTIES[penalty](f.to(up), dec_norm.to(up), model, cfg.tanh_scale, frequency_scale, mesh)
    if cfg.activation == "jumprelu":
        # sparse path: where nothing is dead (asking is free there), no columns to read
        if pre_act_coef > 0 and dead is not None and (code is None or bool(dead.any())):
            th, p, n = model.threshold.clamp(min=0), pre, dec_norm
            if code is not None:  # the loss reads the dead latents' columns only
                p, n, th, dead = SJ.dead_columns(model, x, pre, dec_norm, th, dead)
            gap = pre_act_loss(model.gate_input(p).to(up), n.to(up), th, dead)
            aux = pre_act_coef * (gap if model.per_source else _shared_share(gap, mesh))
    elif cfg.activation == "batchtopk" and dead is not None and auxk_coef > 0:
        aux = auxk_coef * auxk_loss(model, x.float(), x_hat.float(), pre.float(), dec_norm.float(), dead,
                                    k_aux or max(1, cfg.d_in // 2), sparse)
    nested = None
    if cfg.activation == "batchtopk" and nested_k_frac > 0 and nested_k_coef > 0:
        f_nested = batch_topk(pre, dec_norm, nested_k_frac * cfg.k, mesh)[0]  # the top of the same scores
        n_nested = A.kept_count(nested_k_frac * cfg.k, x.shape[0], x.shape[0] * cfg.d_sae)
        x_nested = S.decode_code(model, x, pre, f_nested, n_nested) if sparse else model.decode(f_nested)
        nested = nested_k_coef * nested_topk_mse(x, x_nested)
    total = mse + sparsity_coef * sparsity + aux + (zero if nested is None else nested)
    return LossOutput(total, mse, sparsity, aux, mse_per_source.detach(), f, x_hat, min_kept, nested)
