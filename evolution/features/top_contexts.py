"""Top-activating contexts per feature, kept with bounded memory over a token stream.

`StreamingTopK` holds, per feature, the k largest activations seen so far and where they were
(a flat index `seq * seq_len + pos` into the stream); each batch is merged in with one `topk`, so memory
is O(k * d_sae) whatever the stream length. `contexts_from_topk` turns that into the JSON the feature
browser reads (`analysis/contexts.json`, docs/architecture.md):

    {"<feature>": {"<step>": [{"tokens": [str, ...], "highlight": j, "activation": a}, ...]}}

`tokens` is a window of decoded tokens around the firing position, `highlight` the index of the firing
token inside that window, `activation` the feature's activation there (contexts best first; positions
where the feature does not fire, activation <= 0, are left out).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor


class StreamingTopK:
    """Per-feature running top-k of activations over a stream of batches."""

    def __init__(self, k: int, d_sae: int):
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        self.k = k
        self.values: Float[Tensor, "k d_sae"] = torch.full((0, d_sae), float("-inf"))
        self.index: Int[Tensor, "k d_sae"] = torch.zeros((0, d_sae), dtype=torch.long)

    def add(self, acts: Float[Tensor, "n d_sae"], index: Int[Tensor, " n"]) -> None:
        """Merge a batch: `acts[n, d_sae]` at stream positions `index[n]` (masked positions = -inf)."""
        acts = acts.detach().float().cpu()
        values = torch.cat([self.values, acts])
        where = torch.cat([self.index, index.cpu()[:, None].expand(-1, acts.shape[1])])
        top = values.topk(min(self.k, values.shape[0]), dim=0)
        self.values, self.index = top.values, where.gather(0, top.indices)


def decoder_for(tokenizer=None) -> Callable[[int], str]:
    """A token id -> display string function: `tokenizer.decode([id])` when given, else the id."""
    if tokenizer is None:
        return str
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        return cache[i]

    return decode


def contexts_from_topk(
    topk: StreamingTopK,
    tokens: Int[Tensor, "n_seq seq_len"],
    decode: Callable[[int], str] = str,
    left: int = 12,
    right: int = 4,
    features: list[int] | None = None,
) -> dict[int, list[dict]]:
    """Context windows for each feature's top activations: `{feature: [{"tokens", "highlight", "activation"}]}`."""
    seq_len = tokens.shape[1]
    toks = tokens.tolist()
    out: dict[int, list[dict]] = {}
    features = range(topk.values.shape[1]) if features is None else features
    for i in features:
        rows = []
        for value, flat in zip(topk.values[:, i].tolist(), topk.index[:, i].tolist(), strict=True):
            if not value > 0:  # also drops -inf (masked) and NaN
                break
            seq, pos = divmod(flat, seq_len)
            start, stop = max(0, pos - left), min(seq_len, pos + right + 1)
            rows.append(
                {
                    "tokens": [decode(t) for t in toks[seq][start:stop]],
                    "highlight": pos - start,
                    "activation": round(float(value), 5),
                }
            )
        out[int(i)] = rows
    return out
