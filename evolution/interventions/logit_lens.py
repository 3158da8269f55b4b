"""Logit lens per snapshot (nostalgebraist 2020; LLM-Microscope's `logit_lens`, Razzhigaev et al. 2024).

Each residual-stream point r_l (layer l < L: `blocks.{l}.hook_resid_pre`, l = 0 the embeddings; layer L:
the last block's output, the geometry stage's numbering) is read as if it were the last one: logits_l =
unembed(final_norm(r_l)), the final norm applied with r_l's own statistics. Per layer we record

- `loss`: mean NLL of the next token under logits_l (BOS targets excluded);
- `top1_agreement`: share of positions where argmax logits_l equals the model's own final argmax.

At l = L both are the model's own (loss = the model's loss, agreement = 1), a built-in check.
LLM-Microscope's `logit_lens` applies `lm_head` to HF `hidden_states` without the final norm; here the
final norm is applied at every layer (as the logit lens is usually defined), since without it the
intermediate layers' scale, not their content, decides the softmax.

Everything runs on the model's device (fp32 with TF32 matmuls on CUDA, fp64 on the CPU: `crosscoders.compute`);
per layer two sums come back at the end.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from crosscoders.compute import model_device, stat_dtype, tf32


def final_norm_and_unembed(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(final norm, unembedding) modules of a TransformerLens model or an HF causal LM (llama, GPT-NeoX)."""
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        return model.ln_final, model.unembed
    inner = getattr(model, "model", None) or getattr(model, "gpt_neox", None)
    norm = getattr(inner, "norm", None) or getattr(inner, "final_layer_norm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__}")
    return norm, model.get_output_embeddings()


def logit_lens(model, tokens: Int[Tensor, "n s"], batch_size: int = 8, bos_token_id: int | None = None) -> dict:
    """`{"layers", "loss": [per layer], "top1_agreement": [per layer]}` over every target of `tokens`."""
    from transformer_lens import HookedTransformer

    from evolution.sources.residual import hf_residual

    norm, unembed = final_norm_and_unembed(model)
    hooked = isinstance(model, HookedTransformer)
    device = model_device(model)
    dt = stat_dtype(device)
    nll_sum = agree = None
    count = 0
    with torch.no_grad(), tf32(device):
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size].to(device)
            if hooked:
                n = model.cfg.n_layers
                names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
                _, cache = model.run_with_cache(batch, names_filter=lambda x, names=names: x in names)
                resid = [cache[x] for x in names]
            else:
                resid = hf_residual(model, batch)[1]
            tgt = batch[:, 1:]
            keep = (tgt != bos_token_id) if bos_token_id is not None else torch.ones_like(tgt, dtype=torch.bool)
            # one layer's logits at a time ([batch, seq, vocab]: 0.4 GB per 1,024-token row of Pythia in fp64 on a
            # CPU; all 13 layers' at once held 5.4 GB per row)
            final_top = unembed(norm(resid[-1]))[:, :-1].argmax(-1)
            nll, ag = [], []
            for r in resid:
                lg = unembed(norm(r))[:, :-1]
                ag.append((lg.argmax(-1) == final_top)[keep].sum())
                nll.append(-torch.log_softmax(lg.to(dt), -1).gather(-1, tgt[..., None])[..., 0][keep].double().sum())
                del lg
            nll, ag = torch.stack(nll), torch.stack(ag)
            nll_sum = nll if nll_sum is None else nll_sum + nll
            agree = ag if agree is None else agree + ag
            count = keep.sum() + count
    count = int(count)
    return {"layers": list(range(len(nll_sum))), "loss": (nll_sum / count).tolist(),
            "top1_agreement": (agree.double() / count).tolist(), "n_targets": count}
