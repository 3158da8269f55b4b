"""Residual activations of number tokens in context, averaged over a few templates.

Kantamneni & Tegmark 2025 (§3-4) read "the residual stream on top of the a token" of prompts "a + b"
for single-token integers a ∈ [0, 99]. Here a template is a string with one "{a}" (text after it is
ignored: the model is causal, so only the prefix shapes the activation at a); the prompt is BOS + the
template's prefix + str(a). Each number's activation is the mean over the templates.

**Tokenization.** `pool="single"` (default) requires every number to be one token and raises
`NumberTokenError` otherwise. Tokenizers that split digits (SmolLM2 and Llama-2-style tokenizers split
"42" into "4", "2") need a pooling rule over the number's tokens:

- `pool="last"`: the residual at the number's last token, the first position where a model *can* know
  the whole number (attention reads the earlier digits). Caveat: at the embedding (layer 0, before any
  attention) the last token is just the units digit, so a period-10 structure there is the tokenizer's,
  not something learned; read layer 0 of a digit-splitting model with that in mind.
- `pool="mean"`: the mean over the number's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from crosscoders.errors import UserError
from evolution.geometry.stage import collect_resid

POOLS = ("single", "last", "mean")
PLANTED_TEMPLATES = ("{a}", "w1 w2 {a}", "w5 w3 w9 w1 {a}", "1 + 2 = 3 {a}")
"""Default templates for the planted corpus's word-level tokenizer (base words "w<r>", numbers, "+", "=")."""
TEXT_TEMPLATES = ("{a}", "The number {a}", "I counted {a}", "Output ONLY a number. {a}")
"""Default templates for text tokenizers; the last is the paper's prompt prefix (its Appendix A)."""


class NumberTokenError(UserError):
    """The tokenizer cannot give the requested number tokens (splits a number with pool='single', or lacks it)."""


def default_templates(tokenizer) -> tuple[str, ...]:
    """The planted templates when the tokenizer knows the planted words and '+', else the text templates."""
    vocab = tokenizer.get_vocab()
    return PLANTED_TEMPLATES if all(w in vocab for w in ("w1", "w9", "+", "=")) else TEXT_TEMPLATES


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def number_prompts(
    tokenizer, numbers: Sequence[int], templates: Sequence[str], pool: str = "single"
) -> list[tuple[int, int, list[int], list[int]]]:
    """(number index, template index, token ids with BOS, positions of the number's tokens) per prompt."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    unk = {tokenizer.unk_token_id} - {None}
    out = []
    for j, tpl in enumerate(templates):
        if tpl.count("{a}") != 1:
            raise ValueError(f"template {tpl!r} must contain exactly one '{{a}}'")
        prefix = tpl[: tpl.index("{a}")]
        pre_ids = _encode(tokenizer, prefix)
        if unk & set(pre_ids):
            raise NumberTokenError(f"template {tpl!r} has words the tokenizer does not know (mapped to unk)")
        for i, a in enumerate(numbers):
            ids = _encode(tokenizer, prefix + str(a))
            if ids[: len(pre_ids)] != pre_ids or len(ids) == len(pre_ids):
                raise NumberTokenError(f"template {tpl!r}: the tokens of {a} merge with the text before it")
            num_ids = ids[len(pre_ids):]
            if unk & set(num_ids):
                raise NumberTokenError(f"the tokenizer has no token for the number {a} (mapped to unk)")
            if pool == "single" and len(num_ids) != 1:
                pieces = tokenizer.convert_ids_to_tokens(num_ids)
                raise NumberTokenError(
                    f"the tokenizer splits {a} into {len(num_ids)} tokens {pieces} (template {tpl!r}); "
                    "the helix analysis needs single-token numbers, or pool='last' / 'mean' (see evolution.numbers.acts)")
            pos = list(range(1 + len(pre_ids), 1 + len(ids)))
            out.append((i, j, [bos, *ids], pos[-1:] if pool in ("single", "last") else pos))
    return out


def number_acts(
    model: torch.nn.Module, tokenizer, numbers: Sequence[int], templates: Sequence[str] | None = None,
    pool: str = "single", batch_size: int = 64,
) -> tuple[Float[Tensor, "n_points n_numbers d_model"], list[str]]:
    """Residual stream of each number at every residual point (block inputs + last block output, as in
    `evolution.geometry.stage.collect_resid`), pooled over its tokens, averaged over the templates."""
    templates = list(templates or default_templates(tokenizer))
    prompts = number_prompts(tokenizer, numbers, templates, pool)
    by_len: dict[int, list] = {}
    for p in prompts:  # equal-length prompts run as one batch
        by_len.setdefault(len(p[2]), []).append(p)
    total: Tensor | None = None
    names: list[str] = []
    for group in by_len.values():
        tokens = torch.tensor([p[2] for p in group])
        rows = torch.tensor([(r, q) for r, p in enumerate(group) for q in p[3]])
        resid, names = collect_resid(model, tokens, rows, batch_size)  # [points, n_rows, d], rows in order
        resid = resid.cpu()  # collect_resid leaves it on the model's device; the pooling here is small
        owner = torch.tensor([r for r, p in enumerate(group) for _ in p[3]])
        pooled = torch.zeros(resid.shape[0], len(group), resid.shape[2]).index_add_(1, owner, resid)
        pooled /= torch.bincount(owner, minlength=len(group)).clamp(min=1)[None, :, None].float()
        idx = torch.tensor([p[0] for p in group])
        if total is None:
            total = torch.zeros(resid.shape[0], len(numbers), resid.shape[2])
        total.index_add_(1, idx, pooled)
    return total / len(templates), names
