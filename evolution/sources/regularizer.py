"""The nonlinearity regulariser of pre-training (Razzhigaev et al. 2024, *Your Transformer is Secretly
Linear*, §5: "a cosine-similarity-based regularization, aimed at reducing layer linearity").

Source of the formula: the authors' code release (AIRI-Institute/LLM-Microscope) ships the metrics and the
logit lens but not the regulariser, and the paper's text was not reachable offline, so this implements the
paper's description: the cosine similarity between the embeddings of the same token at consecutive
layers, averaged, is added to the language-model loss with a coefficient λ:

    L = CE + λ · mean_{l = 0..L−1} mean_{tokens t ≥ 1} cos(h_l[t], h_{l+1}[t])

with h_0 the input of block 0 (token + position embedding) and h_{l+1} block l's output (the residual
stream before the final norm, the geometry stage's layers). Minimising the cosine pushes each block's
output away from its input, i.e. makes the block's own contribution large relative to the residual it
passes through, which is what lowers the (with-residual) linearity score. Position 0 (BOS, a constant
attention sink) is left out, as everywhere in the geometry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from evolution.sources.residual import hf_residual


def consecutive_cosine(model: torch.nn.Module, tokens: Int[Tensor, "batch seq"]
                       ) -> tuple[Float[Tensor, "batch seq V"], Float[Tensor, ""]]:
    """(logits, mean cosine between consecutive residual-stream points over layers and tokens t ≥ 1) of an
    HF causal LM, from one forward pass (hooks on the decoder layers)."""
    out, acts = hf_residual(model, tokens)
    cos = torch.stack([F.cosine_similarity(a[:, 1:].float(), b[:, 1:].float(), dim=-1).mean()
                       for a, b in zip(acts, acts[1:], strict=False)])
    return out.logits, cos.mean()


def regularised_loss(model: torch.nn.Module, tokens: Int[Tensor, "batch seq"], bos_token_id: int, coef: float,
                     dtype: str = "float32") -> tuple[Tensor, Tensor, Tensor]:
    """(CE + coef · cosine, CE, cosine) on one batch; CE over targets that are not BOS."""
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        logits, cos = consecutive_cosine(model, tokens)
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    ce = ce[(tokens[:, 1:] != bos_token_id).flatten()].mean()
    return ce + coef * cos, ce, cos
