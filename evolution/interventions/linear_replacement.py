"""Linearity as an intervention: replace a block by its least-squares affine map, or remove it, and
measure what the model loses (Razzhigaev et al. 2024, *Your Transformer is Secretly Linear*, §4:
"removing or linearly approximating some of the most linear blocks ... does not affect significantly
the loss").

For block l with input X = `blocks.{l}.hook_resid_pre` and output Y = `blocks.{l}.hook_resid_post`
(token rows, BOS excluded), the affine map is

    (W, b) = argmin ‖X W + 1 bᵀ − Y‖²_F      (float64, SVD-based least squares on [X, 1])

fitted on positions of the **training** tokens; its held-out R² (`r2_heldout`: 1 − SSE/SST on the
held-out tokens, SST about their own mean) says how well it transfers. Spliced in by a forward hook on
the block module (TransformerLens `model.blocks[l]`, or a Hugging Face decoder layer), the block's
output becomes X W + b ("linear") or X ("identity": the block removed, the residual passes through).

Position 0: when every sequence starts with the same token (BOS), the residual stream at position 0
sees only that token and is one constant vector per model, a huge-norm attention sink the fit leaves
out (as the geometry stage does). The spliced block keeps its true output there (a constant a
linearised model can store), and the intervention acts on positions ≥ 1; with mixed first tokens it
acts on every position.

Device and precision (`crosscoders.compute`): residuals, maps, logits and the NLL sums stay on the device the
snapshot runs on; the fit is float64 there (SVD least squares, as the geometry stage's), the log-softmax is
fp32 with TF32 matmuls on CUDA and fp64 on the CPU, and per eval batch two numbers come back.

Δloss = mean NLL of the intervened model − mean NLL of the original, on the same held-out targets
(BOS targets excluded), paired per eval batch; its CI is a percentile bootstrap over eval batches
(ratio of resampled sums, so batches with more targets weigh more, as in the point estimate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from crosscoders.compute import model_device, stat_dtype, tf32

MODES = ("linear", "identity")


@dataclass
class AffineMap:
    """Y ≈ X @ W + b for one block (fitted in float64, on the device of the residuals it was fitted on)."""

    W: Float[Tensor, "d_model d_model"]
    b: Float[Tensor, " d_model"]

    def __call__(self, X: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        # on X's device and in its statistics precision (a map loaded or fitted elsewhere still applies)
        dt = stat_dtype(X.device)
        return (X.to(dt) @ self.W.to(X.device, dt) + self.b.to(X.device, dt)).to(X.dtype)


def fit_affine(X: Float[Tensor, "n d"], Y: Float[Tensor, "n d"]) -> AffineMap:
    """Least-squares affine map from X to Y on X's device (float64, minimum-norm SVD solve as gelsd's:
    rank-deficient X is fine; layer_metrics says why float64)."""
    from evolution.geometry.layer_metrics import lstsq

    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same tokens, got {X.shape[0]} and {Y.shape[0]} rows")
    Xa = torch.cat([X.to(torch.float64), torch.ones(X.shape[0], 1, dtype=torch.float64, device=X.device)], 1)
    sol = lstsq(Xa, Y.to(Xa.device, torch.float64))
    return AffineMap(sol[:-1], sol[-1])


def r2(pred: Float[Tensor, "n d"], Y: Float[Tensor, "n d"]) -> float:
    """1 − ‖pred − Y‖² / ‖Y − mean Y‖² (float64)."""
    Y = Y.to(torch.float64)
    return float(1 - (pred.to(torch.float64) - Y).pow(2).sum() / (Y - Y.mean(0)).pow(2).sum())


# ---------------------------------------------------------------- splicing


def decoder_blocks(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The transformer blocks: `model.blocks` (TransformerLens) or the decoder layers of an HF model."""
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        return model.blocks
    from evolution.sources.residual import decoder_layers

    return decoder_layers(model)


@contextmanager
def spliced(model: torch.nn.Module, replace: dict[int, Callable[[Tensor], Tensor] | None], keep_first: bool = True
            ) -> Iterator[None]:
    """Within the block, block l's output is `replace[l](input)` (None: the input itself, i.e. the block
    removed); position 0 keeps the true output when `keep_first` (module docstring)."""
    blocks = decoder_blocks(model)

    def make(fn):
        def hook(_mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            new = x.clone() if fn is None else fn(x)
            if keep_first:
                new[:, 0] = y[:, 0]
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return hook

    handles = [blocks[blk].register_forward_hook(make(fn), with_kwargs=True) for blk, fn in replace.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def first_is_constant(tokens: Int[Tensor, "n s"]) -> bool:
    return bool((tokens[:, 0] == tokens[0, 0]).all())


# ---------------------------------------------------------------- losses


def _logits(model, batch: Tensor) -> Tensor:
    out = model(batch)
    return out.logits if hasattr(out, "logits") else out


def batch_nll(model, tokens: Int[Tensor, "n s"], batch_size: int, bos_token_id: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(sum of NLL, number of targets) per batch of `batch_size` rows; BOS targets are excluded. The logits
    stay on the model's device; the sums come back once, at the end."""
    device = model_device(model)
    dt = stat_dtype(device)
    sums, counts = [], []
    with torch.no_grad(), tf32(device):
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size].to(device)
            logp = torch.log_softmax(_logits(model, batch)[:, :-1].to(dt), -1)
            tgt = batch[:, 1:]
            nll = -logp.gather(-1, tgt[..., None])[..., 0]
            keep = tgt != bos_token_id if bos_token_id is not None else torch.ones_like(tgt, dtype=torch.bool)
            sums.append(nll[keep].double().sum())
            counts.append(keep.sum())
    return torch.stack(sums).cpu().numpy(), torch.stack(counts).cpu().numpy().astype(np.float64)


def delta_with_ci(base: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray],
                  n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Δ mean NLL (other − base) over the same batches, with a percentile bootstrap CI over batches."""
    (s0, n), (s1, n1) = base, other
    if not np.array_equal(n, n1):
        raise ValueError("the two losses were not measured on the same targets")
    diff = s1 - s0
    point = diff.sum() / n.sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(n_boot, len(n)))
    boots = diff[idx].sum(1) / n[idx].sum(1)
    lo, hi = np.quantile(boots, [(1 - ci) / 2, (1 + ci) / 2])
    return {"delta": float(point), "ci": [float(lo), float(hi)], "loss": float(s1.sum() / n.sum())}


# ---------------------------------------------------------------- one model


@dataclass
class ReplacementConfig:
    """How each block's map is fitted and scored (a part of `InterventionsConfig`)."""

    n_fit_tokens: int = 4096
    """Training-token positions the affine maps are fitted on (≫ d_model, or the map overfits)."""
    n_score_tokens: int = 2048
    """Held-out positions the maps' R² (`r2_heldout`) is measured on."""
    eval_batch_size: int = 4
    """Held-out rows per eval batch: the unit the Δloss bootstrap resamples."""
    n_bootstrap: int = 1000
    """Bootstrap resamples of the eval batches for Δloss's CI."""
    ci: float = 0.95
    """Coverage of the CIs."""
    prune: bool = True
    """Greedy pruning: replace the k most linear blocks (by held-out R²) together, k = 1..L."""
    prune_max: int | None = None
    """Largest k of the pruning curve (None: every block)."""
    distill_steps: int = 0
    """> 0: also fine-tune each linear map for this many steps of the LM loss on training tokens (the rest
    of the model frozen), as the paper's distillation does, and report it as mode "linear_distilled"."""
    distill_lr: float = 1e-3
    """Adam learning rate of the distillation."""
    seed: int = 0
    """Seed of the token-position samples and the bootstrap."""


def fit_maps(model, fit_tokens: Int[Tensor, "n s"], score_tokens: Int[Tensor, "m s"], cfg: ReplacementConfig
             ) -> tuple[list[AffineMap], list[dict]]:
    """One affine map per block, fitted on `fit_tokens`; per block its in-sample and held-out R² and the
    linearity scores (`evolution.geometry.layer_metrics`, in-sample as the geometry stage computes them) of
    the fit sample, the larger one (an in-sample score needs n ≫ d_model)."""
    from evolution.geometry.stage import collect_resid, sample_positions

    fit_pos = sample_positions(*fit_tokens.shape, cfg.n_fit_tokens, True, cfg.seed)
    score_pos = sample_positions(*score_tokens.shape, cfg.n_score_tokens, True, cfg.seed + 1)
    R, _ = collect_resid(model, fit_tokens, fit_pos)
    S, _ = collect_resid(model, score_tokens, score_pos)
    maps, rows = [], []
    for blk in range(R.shape[0] - 1):
        m = fit_affine(R[blk], R[blk + 1])
        maps.append(m)
        rows.append({"block": blk, "r2_fit": r2(m(R[blk].double()), R[blk + 1]), "r2_heldout": r2(m(S[blk].double()), S[blk + 1]),
                     "linearity": _score(R[blk], R[blk + 1], True), "linearity_no_residual": _score(R[blk], R[blk + 1], False)})
    return maps, rows


def _score(X: Tensor, Y: Tensor, residual: bool) -> float | None:
    """The geometry stage's linearity score; None where undefined (a block that writes nothing has a
    constant Y − X, so no score without the residual)."""
    from evolution.geometry.layer_metrics import linearity_score

    try:
        return linearity_score(X, Y, residual)
    except ValueError:
        return None


def distill_map(model, block: int, m: AffineMap, tokens: Int[Tensor, "n s"], cfg: ReplacementConfig,
                bos_token_id: int | None, keep_first: bool) -> AffineMap:
    """Fine-tune (W, b) on the LM loss with block `block` replaced by it and every weight of the model frozen."""
    device = model_device(model)  # the parameters live where the model runs
    W = torch.nn.Parameter(m.W.float().clone().to(device))
    b = torch.nn.Parameter(m.b.float().clone().to(device))
    opt = torch.optim.Adam([W, b], lr=cfg.distill_lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    try:
        with (spliced(model, {block: lambda x: x @ W.to(x.dtype) + b.to(x.dtype)}, keep_first), torch.enable_grad(),
              tf32(device)):
            for _ in range(cfg.distill_steps):
                batch = tokens[torch.randint(0, len(tokens), (cfg.eval_batch_size,), generator=g)].to(device)
                logp = torch.log_softmax(_logits(model, batch)[:, :-1].float(), -1)
                tgt = batch[:, 1:]
                nll = -logp.gather(-1, tgt[..., None])[..., 0]
                keep = tgt != bos_token_id if bos_token_id is not None else torch.ones_like(tgt, dtype=torch.bool)
                loss = nll[keep].mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return AffineMap(W.detach().double(), b.detach().double())


def block_interventions(model, fit_tokens: Int[Tensor, "n s"], eval_tokens: Int[Tensor, "m s"],
                        cfg: ReplacementConfig | None = None, bos_token_id: int | None = None) -> dict:
    """Δloss of replacing each block by its affine map and of removing it, with CIs, and greedy pruning.

    Returns `{"base_loss", "blocks": [{block, r2_fit, r2_heldout, linearity, linearity_no_residual,
    linear: {delta, ci, loss}, identity: {...}}], "prune": {"order", "linear": [...], "identity": [...]}}`;
    `prune[mode][k-1]` is the Δloss with the k most linear blocks (by held-out R²) replaced together."""
    cfg = cfg or ReplacementConfig()
    keep_first = first_is_constant(eval_tokens) and first_is_constant(fit_tokens)
    maps, rows = fit_maps(model, fit_tokens, eval_tokens, cfg)
    nll = lambda: batch_nll(model, eval_tokens, cfg.eval_batch_size, bos_token_id)  # noqa: E731
    base = nll()
    stats = lambda other: delta_with_ci(base, other, cfg.n_bootstrap, cfg.ci, cfg.seed)  # noqa: E731
    fns = {"linear": lambda blk: maps[blk], "identity": lambda blk: None}
    from crosscoders.progress import progress_bar

    for row in progress_bar(rows, desc="blocks", unit="block", leave=False):
        blk = row["block"]
        for mode, fn in fns.items():
            with spliced(model, {blk: fn(blk)}, keep_first):
                row[mode] = stats(nll())
        if cfg.distill_steps > 0:
            dm = distill_map(model, blk, maps[blk], fit_tokens, cfg, bos_token_id, keep_first)
            with spliced(model, {blk: dm}, keep_first):
                row["linear_distilled"] = stats(nll())
    out = {"base_loss": float(base[0].sum() / base[1].sum()), "n_eval_targets": int(base[1].sum()),
           "keep_first": keep_first, "blocks": rows}
    if cfg.prune:
        order = sorted(range(len(rows)), key=lambda blk: -rows[blk]["r2_heldout"])
        out["prune"] = {"order": order}
        for mode, fn in fns.items():
            out["prune"][mode] = []
            for k in range(1, min(len(order), cfg.prune_max or len(order)) + 1):
                with spliced(model, {blk: fn(blk) for blk in order[:k]}, keep_first):
                    out["prune"][mode].append({"k": k, "blocks": order[:k], **stats(nll())})
    return out
