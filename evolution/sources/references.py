"""Loss references from n-gram statistics: what a model scores by counting alone.

The *statistical phase* of pre-training (DESIGN.md) is the stretch where the loss falls toward the
entropy of the token statistics: first the unigram entropy H(x_t), then the conditional bigram
entropy H(x_t | x_{t-1}). These numbers are the horizontal reference lines on the loss figure.

On the planted corpus (`evolution.sources.corpus`) each token also carries the mechanism that produced it,
and `mechanism_references` gives, per mechanism, the cross-entropy of add-α smoothed n-gram models on
exactly those tokens. **Rule for "learned"** (used by the loss figures and the phase map): a mechanism
counts as learned by a model at the first step where the model's eval loss on that mechanism's tokens
falls below the best (lowest) reference among the models that *cannot* explain it (`LEARNED_BELOW`,
`learned_threshold`):

- unigram tokens (i.i.d. Zipf draws): below the uniform model, log V. A unigram model explains them
  fully, so no n-gram model sits between; the next stage (falling to `unigram_model`) is the floor.
- bigram tokens (a trigger's fixed successors): below the unigram model.
- copy tokens (spans repeated within a document): below the unigram, the bigram *and the cache*
  model. Only induction (previous token matched earlier -> predict what followed it; Olsson et al.
  2022) explains them. The cache model (Kuhn & De Mori 1990: a unigram model mixed with the counts of
  the tokens already in the context) is there because merely boosting tokens seen earlier, which a
  one-layer model learns early, also beats the n-gram models on copied tokens; beating the cache model
  needs to know *which* earlier token comes next.
- topic tokens (drawn from the document's topic words): below both n-gram models; only the context
  (which topic words appeared earlier) explains them.

Both n-gram models enter for copy/topic because add-α smoothing makes the bigram model worse than the
unigram model on tokens whose context rows are sparse, and "learned" must mean beating every counter.

Conventions: nats; `tokens` rows start with BOS; targets are `tokens[:, 1:]`, and a BOS/EOS id
(`bos_token_id`, also the packing separator of text corpora) is never a target, though it is a context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

LEARNED_BELOW = {
    "unigram": ("uniform_model",),
    "bigram": ("uniform_model", "unigram_model"),
    "copy": ("uniform_model", "unigram_model", "bigram_model", "cache_model"),
    "topic": ("uniform_model", "unigram_model", "bigram_model"),
    # Planted numbers (PlantedConfig.p_number): a counting run's next number is partly a bigram (a -> a+1),
    # but only the run context says a run is under way; a sum's c needs a and b (no counter explains it), and
    # must also beat log(number_modulus), knowing only that a number comes (`planted.number_references`).
    "count": ("uniform_model", "unigram_model", "bigram_model"),
    "add": ("uniform_model", "unigram_model", "bigram_model", "cache_model", "number_uniform_model"),
}
"""Per mechanism, the references that cannot explain it; learned = loss below the lowest of them. The
uniform model is among them for every mechanism: a rare mechanism's tokens can score worse than log V
under the n-gram models (they are rare in training), and beating a reference worse than knowing nothing
proves nothing."""


def learned_threshold(references: dict[str, dict[str, float | None]], mechanism: str) -> float | None:
    """The loss a model must get below on `mechanism`'s tokens for it to count as learned.

    `references` is the output of `mechanism_references` (or meta.json's "mechanism_references").
    None when the mechanism has no eval tokens.
    """
    entry = references[mechanism]
    values = [entry[k] for k in LEARNED_BELOW[mechanism] if entry.get(k) is not None]
    return min(values) if values else None


def _pairs(tokens: Int[Tensor, "n_seq seq_len"], bos_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(context, target, keep) flattened over all positions 1..seq_len-1; keep drops BOS targets."""
    tokens = torch.as_tensor(tokens).long()
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_seq, seq_len>=2], got shape {tuple(tokens.shape)}")
    prev, nxt = tokens[:, :-1], tokens[:, 1:]
    return prev, nxt, nxt != bos_token_id


def _entropy_from_counts(counts: Tensor) -> float:
    p = counts.double() / counts.sum()
    return float(-(p * p.log()).sum())


def unigram_entropy(tokens: Int[Tensor, "n_seq seq_len"], bos_token_id: int = 0) -> float:
    """Empirical (plug-in) entropy H(x_t) of the target tokens, in nats."""
    _, nxt, keep = _pairs(tokens, bos_token_id)
    targets = nxt[keep]
    if targets.numel() == 0:
        raise ValueError("unigram_entropy: no target tokens (every target is BOS)")
    _, counts = torch.unique(targets, return_counts=True)
    return _entropy_from_counts(counts)


def bigram_entropy(tokens: Int[Tensor, "n_seq seq_len"], bos_token_id: int = 0) -> float:
    """Empirical conditional entropy H(x_t | x_{t-1}) = H(x_{t-1}, x_t) - H(x_{t-1}), in nats.

    Counted over (context, target) pairs with a non-BOS target; the plug-in estimate is biased low by
    about (#observed pairs - #observed contexts) / (2N), so it needs N well above the number of pairs.
    """
    prev, nxt, keep = _pairs(tokens, bos_token_id)
    prev, nxt = prev[keep], nxt[keep]
    if nxt.numel() == 0:
        raise ValueError("bigram_entropy: no target tokens (every target is BOS)")
    vocab = int(max(prev.max(), nxt.max())) + 1
    _, pair_counts = torch.unique(prev * vocab + nxt, return_counts=True)
    _, ctx_counts = torch.unique(prev, return_counts=True)
    return _entropy_from_counts(pair_counts) - _entropy_from_counts(ctx_counts)


def _lookup(keys_sorted: Tensor, counts: Tensor, query: Tensor) -> Tensor:
    """counts[key] for each query key (0 where unseen), via binary search over the sorted unique keys."""
    if keys_sorted.numel() == 0:
        return torch.zeros_like(query, dtype=torch.float64)
    idx = torch.searchsorted(keys_sorted, query.contiguous()).clamp(max=keys_sorted.numel() - 1)
    return torch.where(keys_sorted[idx] == query, counts[idx], 0).double()


def ngram_log_probs(
    train_tokens: Int[Tensor, "n_seq seq_len"],
    eval_tokens: Int[Tensor, "n_eval seq_len"],
    order: int,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    bos_token_id: int = 0,
) -> Tensor:
    """log p(x_t | ...) of each eval target under an add-α unigram (order=1) or bigram (order=2) model.

    Returns float64 `[n_eval, seq_len - 1]` aligned with `eval_tokens[:, 1:]` (NaN where the target is
    BOS). p(w) = (c(w)+α)/(N+αV); p(w|v) = (c(v,w)+α)/(c(v,·)+αV), counts from `train_tokens`. Counts
    are kept sparse (sorted keys), so a 50k vocabulary costs memory in tokens, not V².
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    prev, nxt, keep = _pairs(train_tokens, bos_token_id)
    eprev, enxt, ekeep = _pairs(eval_tokens, bos_token_id)
    V = vocab_size or int(max(torch.as_tensor(train_tokens).max(), torch.as_tensor(eval_tokens).max())) + 1
    if order == 1:
        keys, counts = torch.unique(nxt[keep], return_counts=True)
        num = _lookup(keys, counts, enxt) + alpha
        den = float(keep.sum()) + alpha * V
    else:
        keys, counts = torch.unique(prev[keep] * V + nxt[keep], return_counts=True)
        ctx_keys, ctx_counts = torch.unique(prev[keep], return_counts=True)
        num = _lookup(keys, counts, eprev * V + enxt) + alpha
        den = _lookup(ctx_keys, ctx_counts, eprev) + alpha * V
    logp = num.log() - torch.as_tensor(den, dtype=torch.float64).log()
    return torch.where(ekeep, logp, torch.nan)


def _context_counts(tokens: Tensor, bos_token_id: int, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """For each target x_t (t >= 1): how often x_t occurred among x_1..x_{t-1}, and how many non-BOS
    tokens those are. Both `[n_seq, seq_len - 1]`."""
    counts, n_ctx = [], []
    T = tokens.shape[1]
    earlier = torch.ones(T - 1, T - 1, dtype=torch.bool).tril(-1)  # [target t-1, source s-1], s < t
    for rows in tokens.split(chunk):
        x = rows[:, 1:]
        counts.append(((x[:, :, None] == x[:, None, :]) & earlier).sum(-1))
        n_ctx.append(torch.cat([torch.zeros_like(x[:, :1]), (x != bos_token_id).cumsum(1)[:, :-1]], 1))
    return torch.cat(counts), torch.cat(n_ctx)


def cache_log_probs(
    train_tokens: Int[Tensor, "n_seq seq_len"],
    eval_tokens: Int[Tensor, "n_eval seq_len"],
    lam: float | None = None,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    bos_token_id: int = 0,
    n_fit_rows: int = 512,
) -> Tensor:
    """log p(x_t | x_<t) under a cache model: p = λ·c_t(x_t)/n_t + (1-λ)·p_unigram(x_t), where c_t counts
    x_t among the n_t earlier (non-BOS) tokens of the row (p = p_unigram when n_t = 0).

    `lam=None` picks λ from a grid by likelihood on the first `n_fit_rows` train rows. Returns float64
    `[n_eval, seq_len - 1]`, NaN at BOS targets, like `ngram_log_probs`.
    """
    train_tokens, eval_tokens = torch.as_tensor(train_tokens).long(), torch.as_tensor(eval_tokens).long()

    def logp(tokens: Tensor, lam: float) -> Tensor:
        uni = ngram_log_probs(train_tokens, tokens, 1, alpha, vocab_size, bos_token_id).exp()
        c, n = _context_counts(tokens, bos_token_id)
        cache = c.double() / n.clamp(min=1).double()
        return torch.where(n > 0, lam * cache + (1 - lam) * uni, uni).log()

    if lam is None:
        fit = train_tokens[:n_fit_rows]
        grid = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
        lam = max(grid, key=lambda g: float(logp(fit, g).nan_to_num(nan=0.0).sum()))
    return logp(eval_tokens, lam)


def mechanism_references(
    train_tokens: Int[Tensor, "n_seq seq_len"],
    eval_tokens: Int[Tensor, "n_eval seq_len"],
    eval_mechanism: Int[Tensor, "n_eval seq_len"],
    names: Sequence[str],
    alpha: float = 0.1,
    vocab_size: int | None = None,
    bos_token_id: int = 0,
) -> dict[str, dict[str, float | None]]:
    """Per mechanism: cross-entropy (nats/token) on the eval tokens labelled with it, of

    - `uniform_model`: log V,
    - `unigram_model`: add-α unigram model fitted on `train_tokens`,
    - `bigram_model`: add-α bigram model fitted on `train_tokens`,
    - `cache_model`: the unigram model mixed with the in-context token counts (`cache_log_probs`),
      its mixing weight fitted on `train_tokens`.

    `eval_mechanism[i, t]` is the index into `names` of the mechanism that produced `eval_tokens[i, t]`
    (-1: BOS or no mechanism). A mechanism with no eval tokens gets None. See `LEARNED_BELOW` and the
    module docstring for the rule that turns these into "learned" steps.
    """
    eval_mechanism = torch.as_tensor(eval_mechanism).long()
    if eval_mechanism.shape != torch.as_tensor(eval_tokens).shape:
        raise ValueError(
            f"eval_mechanism shape {tuple(eval_mechanism.shape)} != eval_tokens shape {tuple(eval_tokens.shape)}"
        )
    V = vocab_size or int(max(torch.as_tensor(train_tokens).max(), torch.as_tensor(eval_tokens).max())) + 1
    lp = {
        "unigram_model": ngram_log_probs(train_tokens, eval_tokens, 1, alpha, V, bos_token_id),
        "bigram_model": ngram_log_probs(train_tokens, eval_tokens, 2, alpha, V, bos_token_id),
        "cache_model": cache_log_probs(train_tokens, eval_tokens, None, alpha, V, bos_token_id),
    }
    labels = eval_mechanism[:, 1:]
    out: dict[str, dict[str, float | None]] = {}
    for k, name in enumerate(names):
        mask = (labels == k) & ~lp["unigram_model"].isnan()
        if not mask.any():
            out[name] = {"uniform_model": None, **{m: None for m in lp}}
            continue
        out[name] = {"uniform_model": math.log(V)}
        out[name].update({m: float(-v[mask].mean()) for m, v in lp.items()})
    return out


# ---------------------------------------------------------------- held-out references and full n-gram tables

HELDOUT_ALPHA = 0.1
"""Default add-α of the held-out references and of the KL reference distributions (the same α as
`mechanism_references`): a pair never seen in the train tokens keeps probability α/(c(v)+αV)."""


def heldout_entropies(
    train_tokens: Int[Tensor, "n_seq seq_len"],
    eval_tokens: Int[Tensor, "n_eval seq_len"],
    alpha: float = HELDOUT_ALPHA,
    vocab_size: int | None = None,
    bos_token_id: int = 0,
) -> dict[str, float]:
    """Held-out unigram / bigram references (nats/token): the cross-entropy on the eval targets of the
    add-α unigram and bigram models fitted on the train tokens (`ngram_log_probs`).

    Unlike the plug-in `bigram_entropy` (in-sample, biased low by unseen pairs), this is what a bigram
    table *counted on the training data* scores on new text, so a model's held-out loss can be compared
    with it. One estimator serves the loss figure's reference line and the phase signal
    `loss_below_bigram` (`evolution.phases`)."""
    out: dict[str, float] = {}
    for name, order in (("unigram", 1), ("bigram", 2)):
        lp = ngram_log_probs(train_tokens, eval_tokens, order, alpha, vocab_size, bos_token_id)
        out[f"heldout_{name}_entropy"] = float(-lp[~lp.isnan()].mean())
    return {**out, "heldout_alpha": float(alpha)}


def unigram_log_probs_table(
    train_tokens: Int[Tensor, "n_seq seq_len"], vocab_size: int, alpha: float = HELDOUT_ALPHA, bos_token_id: int = 0
) -> Tensor:
    """log q(w) = log((c(w)+α)/(N+αV)) for every w < `vocab_size`, float64 `[V]` (counts over non-BOS targets)."""
    _, nxt, keep = _pairs(train_tokens, bos_token_id)
    counts = torch.bincount(nxt[keep], minlength=vocab_size)[:vocab_size].double()
    return (counts + alpha).log() - math.log(float(keep.sum()) + alpha * vocab_size)


def bigram_table(
    train_tokens: Int[Tensor, "n_seq seq_len"], vocab_size: int, alpha: float = HELDOUT_ALPHA, bos_token_id: int = 0
) -> dict[str, Tensor | float]:
    """The add-α bigram model q(w|v) = (c(v,w)+α)/(c(v,·)+αV) in sparse (CSR) form, for expectations under
    a full next-token distribution without a V×V matrix:

        log q(w|v) = log α − log(c(v,·)+αV) + log1p(c(v,w)/α),

    the last term non-zero only on the pairs seen in training. Keys: `crow` [V+1] and `col` [nnz] (CSR of
    the seen pairs), `log1p` [nnz] = log1p(c(v,w)/α), `log_den` [V] = log(c(v,·)+αV), `log_alpha`."""
    prev, nxt, keep = _pairs(train_tokens, bos_token_id)
    V = vocab_size
    keys, counts = torch.unique(prev[keep] * V + nxt[keep], return_counts=True)  # sorted: row-major CSR order
    rows, cols = keys // V, keys % V
    crow = torch.zeros(V + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=V)[:V].cumsum(0)
    ctx = torch.bincount(prev[keep], minlength=V)[:V].double()
    return {"crow": crow, "col": cols, "log1p": torch.log1p(counts.double() / alpha),
            "log_den": (ctx + alpha * V).log(), "log_alpha": math.log(alpha)}


def expected_bigram_log_q(
    p: Float[Tensor, "n V"], context: Int[Tensor, " n"], table: dict[str, Tensor | float]
) -> Float[Tensor, " n"]:
    """Σ_w p[i, w] · log q(w | context[i]) under `bigram_table`, touching only the seen pairs of each context."""
    crow, col, l1p = table["crow"], table["col"], table["log1p"]
    context = context.long()
    start, lengths = crow[context], crow[context + 1] - crow[context]
    dev = context.device  # the table lives where p does (evaluate moves it to the model's device)
    row = torch.repeat_interleave(torch.arange(len(context), device=dev), lengths)
    first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    idx = torch.repeat_interleave(start, lengths) + torch.arange(int(lengths.sum()), device=dev) - first
    seen = torch.zeros(len(context), dtype=torch.float64, device=dev).index_add_(0, row, p[row, col[idx]].double() * l1p[idx])
    return table["log_alpha"] - table["log_den"][context] + seen
