"""Logit effects of crosscoder features per snapshot: the tokens a feature's decoder direction promotes
and suppresses when read out through snapshot s's final norm and unembedding (the "top logits" of SAE
dashboards, Bricken et al. 2023), so one can watch a feature's meaning settle across snapshots.

For feature i and snapshot s with decoder direction d = W_dec[s, i] (raw activation space: the
crosscoder folds its normalisation scales into W_dec on save):

    effect[s, i] = norm_lin(d) @ W_U[s]          [d_vocab]

where norm_lin is the final norm's action on a *direction* at a fixed token: LayerNorm (GPT-NeoX,
Pythia) centres and multiplies by its gain, norm_lin(d) = γ ⊙ (d − mean(d)); RMSNorm (llama) only
multiplies by γ. The 1/σ (1/rms) factor is a positive per-token scalar that changes no ranking and is
left out; LayerNorm's bias β and W_U's bias add the same to every feature and are left out. So the
values are logits per unit of normalised residual: compare them within one snapshot, not across.
For a crosscoder on a hook before the last block this is the direct path only (later blocks are skipped),
as in SAE dashboards.

The [d_sae, d_vocab] matrix (24,576 × 50,304 fp32 = 4.9 GB for Pythia-160M) is never whole: `top_logit_effects`
forms and ranks it `chunk_bytes` of rows at a time on the model's device, with TF32 matmuls on CUDA, and only
the top-k ids and values come back to the host (whole, ranking it held three such matrices, 15 GB).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from crosscoders.compute import tf32


def norm_parameters(model) -> tuple[Tensor | None, bool]:
    """(gain γ or None, centres?) of the final norm of a TransformerLens model or an HF causal LM."""
    from evolution.interventions.logit_lens import final_norm_and_unembed

    norm, _ = final_norm_and_unembed(model)
    gain = getattr(norm, "w", None)
    if gain is None:
        gain = getattr(norm, "weight", None)
    name = type(norm).__name__.lower()
    centres = "rms" not in name  # LayerNorm / LayerNormPre centre; RMSNorm does not
    return (None if gain is None else gain.detach().float()), centres


def unembedding(model) -> Float[Tensor, "d_model d_vocab"]:
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        return model.W_U.detach().float()
    return model.get_output_embeddings().weight.detach().float().T


def logit_effects_matrix(model, W_dec: Float[Tensor, "d_sae d_model"]) -> Float[Tensor, "d_sae d_vocab"]:
    """Every feature's logit effect through `model`'s final norm and unembedding (module docstring), on the
    model's device."""
    gain, centres = norm_parameters(model)
    W_U = unembedding(model)
    D = W_dec.detach().to(W_U.device, torch.float32)
    if centres:
        D = D - D.mean(-1, keepdim=True)
    if gain is not None:
        D = D * gain
    with tf32(W_U.device):
        return D @ W_U


def top_effects(effects: Float[Tensor, "d_sae d_vocab"], k: int = 5, features: list[int] | None = None
                ) -> dict[int, dict[str, list]]:
    """{feature: {"promoted": [[token id, value], ...], "suppressed": [...]}}, k each, largest first."""
    feats = list(range(effects.shape[0])) if features is None else features
    E = effects if features is None else effects[feats]
    up_v, up_i = (t.cpu() for t in E.topk(k, dim=-1))  # ranked on the device, k per feature come back
    dn_v, dn_i = (t.cpu() for t in E.topk(k, dim=-1, largest=False))
    return {f: {"promoted": [[int(t), round(float(v), 4)] for t, v in zip(up_i[j], up_v[j], strict=True)],
                "suppressed": [[int(t), round(float(v), 4)] for t, v in zip(dn_i[j], dn_v[j], strict=True)]}
            for j, f in enumerate(feats)}


def top_logit_effects(model, W_dec: Float[Tensor, "d_sae d_model"], k: int = 5, chunk_bytes: int = 256 << 20
                      ) -> dict[int, dict[str, list]]:
    """`top_effects(logit_effects_matrix(model, W_dec), k)`, formed `chunk_bytes` of effect rows at a time: the
    whole matrix is d_sae × d_vocab (module docstring)."""
    rows = max(1, chunk_bytes // (4 * unembedding(model).shape[1]))
    out: dict[int, dict[str, list]] = {}
    for lo in range(0, W_dec.shape[0], rows):
        part = top_effects(logit_effects_matrix(model, W_dec[lo : lo + rows]), k)
        out.update({lo + j: v for j, v in part.items()})
    return out
