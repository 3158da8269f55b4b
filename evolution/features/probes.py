"""What a feature is: per feature and snapshot, its top contexts and three type scores, plus its
ground-truth mechanism on the planted corpus (issue 4, item 2).

A feature's activation **in snapshot s** is `crosscoders.model.activations_per_snapshot(...)[:, s]`, the
one definition (per-source gate: the code f[s, i]; shared gate: f_i |W_dec[s, i]|). The pre-activation is
shared by all snapshots, so every source's snapshot is run over the probe stream (one model at a time)
and `sum_s W_enc[s] x_s + b_enc` is accumulated first (`shared_pre_acts`); each probed snapshot's
activations then come from that sum and its decoder norms. Position 0 of every row (BOS) and any BOS token are
excluded everywhere. All scores are computed from a `FeatureActsFn` (tokens -> activations), so they
work for any reader of the residual stream, not only crosscoders.

Raw statistics (one value per feature and snapshot), named for what they are. They are not the feature
types: those are the null-referenced scores of `evolution.features.types` (`type_score_*` in features.csv),
the one family of type scores every output shows.

- `r2_current`, `r2_previous`: cross-fitted R² of the activation predicted by the current token's
  identity, resp. the previous token's (per-token mean; `probes_stats.GroupR2`), on the probe stream.
- `r2_prev_minus_current` = max(r2_previous, 0) − max(r2_current, 0), in [−1, 1]: > 0 when the previous
  token determines the activation better than the current one (a previous-token feature scores ~1, a
  current-token feature ~−1). On a stream where consecutive tokens are correlated (a bigram grammar)
  both R² borrow from each other; the difference still says which token the feature reads.
- `induction_contrast` (Olsson et al. 2022; TransformerLens's repeated-random-tokens test): on
  sequences `BOS + R + R` with R uniform random tokens (drawn from the tokens seen in the probe
  stream, without repetition inside R when the vocabulary allows, so every second-copy token has
  exactly one earlier occurrence and no first-copy token has one), mean activation over the second
  copy m2 versus the first m1 (each copy's first token left out, so both halves see a previous token
  from R):
  `(m2 − m1) / (|m2| + |m1|)`, in [−1, 1]; ~1 for a feature that fires only when the continuation is
  predictable by copying, ~0 for one indifferent to repetition. NaN when the feature never fires there.
- `unexplained_by_token` = 1 − clip(r2_current, 0, 1): the share of the activation's variance
  that the current token alone does not explain, held out (~0 for a pure token feature; previous-token,
  induction and topic features are all context-dependent by this measure).

Ground-truth type (planted corpus, labels from `evolution.sources.corpus.MECHANISMS`, -1 = none): the
activation-weighted distribution of mechanism labels over the positions where the feature fires.
The residual stream at position t has read tokens ≤ t and is trained to predict token t+1, so the
label of **t+1** says which mechanism the feature helps predict: that is `gt_type` / `gt_purity`
(purity = the argmax label's share of the feature's labelled activation mass; `gt_lift` = purity over
that label's base rate, since a feature firing everywhere has the majority label's base rate as
purity). The label of t itself
(which mechanism produced the token the feature sits on) is reported as `gt_type_current`.
`gt_token_lift` = purity over the **token-matched** purity: the share of that label expected if the feature
were a pure function of the current token, Σ_t a_t q(label | token_t) / Σ_t a_t with q the label
distribution of t+1 given the token at t on the same stream. A current-token feature whose token often
precedes a copied token gets gt_lift > 1 but gt_token_lift ≈ 1; only a feature that reads more than its
token (a copy feature that fires where the copy applies) clears it. The hierarchy uses it for the
mechanisms that depend on more than the current token (`evolution.features.hierarchy`).

Use (the analysis stage):

    res = probe_features(Crosscoder.load(run / "crosscoder"), SnapshotSource.for_run(run).iter(crosscoder_steps),
                         corpus.eval_tokens, hook, corpus.eval_mechanism, steps=crosscoder_steps,
                         tokenizer=corpus.tokenizer, bos_token_id=corpus.bos_token_id)
    features = features.merge(res.table[["feature", *PROBE_COLUMNS]], on="feature")
    res.save(run / "analysis")   # probe_scores.safetensors (per snapshot) + contexts.json

Ge et al. 2025 (arXiv 2509.17196) sort features into previous-token, induction and context-dependent
groups with scores of this kind and find they form in that order during pre-training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from crosscoders.io import save_safetensors, write_json
from crosscoders.progress import progress_bar
from evolution.features.probe_stats import FoldMoments, GroupR2, LabelMass, group_ids
from evolution.features.snapshot_acts import PreActs, SnapshotActs, encode_token_sets
from evolution.features.top_contexts import StreamingTopK, contexts_from_topk, decoder_for
from evolution.sources.planted import MECHANISMS

FeatureActsFn = Callable[[Int[Tensor, "batch pos"]], Float[Tensor, "batch pos d_sae"]]
PROBE_COLUMNS = ("r2_current", "r2_previous", "induction_contrast", "gt_type", "gt_purity")
"""the columns of `ProbeResult.table` that go into analysis/features.csv (gt_* only on the planted corpus)"""


@dataclass
class ProbeConfig:
    """What `probe_features` measures and on how much data."""

    top_k: int = 10
    """contexts kept per feature and snapshot"""
    window_left: int = 12
    """tokens of context shown before the firing token"""
    window_right: int = 4
    """tokens of context shown after the firing token"""
    batch_size: int = 16
    """sequences per forward pass"""
    autocast: str = "none"
    """the snapshots' forward precision: the harvest's, read from the store manifest by analyze"""
    max_seqs: int = 256
    """probe stream length cap (sequences); the stream is also the held-out data for the R² scores"""
    max_groups: int = 4096
    """token-identity groups for the R² scores (rarer tokens share one group); memory ~ 16 B x groups x d_sae"""
    induction_len: int = 32
    """length of the random sequence R in BOS + R + R (capped by the model's n_ctx and the stream's vocabulary)"""
    induction_seqs: int = 64
    """number of BOS + R + R sequences"""
    seed: int = 0
    """seed of the random induction sequences"""
    at: str = "peak"
    """snapshot whose scores fill the feature table: "peak" (the feature's largest decoder norm among the
    probed snapshots: a feature that fades barely fires at the end) or "final" """
    n_context_steps: int = 3
    """when no steps are named for contexts: this many probed snapshots, evenly spaced, the last included"""


def _batched(fn: FeatureActsFn | SnapshotActs, tokens: Tensor, batch_size: int) -> Iterable[tuple[int, Tensor]]:
    for lo in range(0, tokens.shape[0], batch_size):
        if isinstance(fn, SnapshotActs):
            yield lo, fn.rows(lo, lo + batch_size)
        else:
            yield lo, fn(tokens[lo : lo + batch_size])


def random_rows(vocab: Int[Tensor, " v"], seq_len: int, n_seqs: int, g: torch.Generator) -> Tensor:
    """`n_seqs` rows of `seq_len` random tokens of `vocab`, distinct within a row when the vocabulary allows."""
    if seq_len <= len(vocab):  # distinct tokens: a copy holds no repeat, each match is unique
        return vocab[torch.rand(n_seqs, len(vocab), generator=g).argsort(dim=1)[:, :seq_len]]
    return vocab[torch.randint(len(vocab), (n_seqs, seq_len), generator=g)]


def induction_tokens(vocab: Int[Tensor, " v"], seq_len: int, n_seqs: int, bos_token_id: int, seed: int = 0) -> Tensor:
    """BOS + R + R, R random tokens of `vocab` (distinct within R when the vocabulary allows); the type probe's
    repeat set under the same seed (`type_probe.repeat_and_control`), so the two share one encoding."""
    R = random_rows(vocab, seq_len, n_seqs, torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((n_seqs, 1), bos_token_id, dtype=torch.long), R, R], dim=1)


def probe_vocab(tokens: Tensor, bos: int) -> Tensor:
    vocab = tokens.unique()
    return vocab[vocab != bos]


def induction_len(cfg: ProbeConfig, n_ctx: int, vocab: Tensor) -> int:
    return min(cfg.induction_len, (n_ctx - 1) // 2, len(vocab))


def probe_token_sets(tokens: Int[Tensor, "n_seq seq_len"], n_ctx: int, cfg: ProbeConfig, bos: int) -> list[Tensor]:
    """What `probe_features` encodes: the first `cfg.max_seqs` rows of `tokens` and the induction set."""
    tokens = tokens[: cfg.max_seqs].long().cpu()
    vocab = probe_vocab(tokens, bos)
    return [tokens, induction_tokens(vocab, induction_len(cfg, n_ctx, vocab), cfg.induction_seqs, bos, cfg.seed)]


def induction_scores(
    acts_fn: FeatureActsFn, vocab: Int[Tensor, " v"], seq_len: int, n_seqs: int, bos_token_id: int, seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Float[Tensor, " d_sae"]]:
    """Induction score on BOS + R + R (see the module docstring); also the two half means."""
    if seq_len < 2:
        raise ValueError(f"induction score needs a random sequence of >= 2 tokens, got {seq_len}")
    tokens = induction_tokens(vocab, seq_len, n_seqs, bos_token_id, seed)
    # offsets 1..L-1 inside each copy: the copy's first token is left out of both halves, so that
    # every compared position has a previous token from R (in the first copy it would be BOS)
    first = second = 0.0
    for _, a in _batched(acts_fn, tokens, batch_size):
        first = first + a[:, 2 : seq_len + 1].double().sum((0, 1))
        second = second + a[:, seq_len + 2 :].double().sum((0, 1))
    m1, m2 = first / (n_seqs * (seq_len - 1)), second / (n_seqs * (seq_len - 1))
    denom = m1.abs() + m2.abs()
    score = torch.where(denom > 1e-9, (m2 - m1) / denom.clamp(min=1e-30), torch.full_like(denom, float("nan")))
    return {"induction_contrast": score.float(), "induction_first": m1.float(), "induction_second": m2.float()}


def stream_scores(
    acts_fn: FeatureActsFn,
    tokens: Int[Tensor, "n_seq seq_len"],
    mechanism: Int[Tensor, "n_seq seq_len"] | None = None,
    bos_token_id: int | None = None,
    top_k: int = 0,
    batch_size: int = 16,
    max_groups: int = 4096,
    n_labels: int = len(MECHANISMS),
) -> tuple[dict[str, Tensor], StreamingTopK | None]:
    """One pass over `tokens`: R² scores, previous-token and context scores, label mass, top-k."""
    n_seq, seq_len = tokens.shape
    cur_g, n_groups = group_ids(tokens, max_groups)
    prev_g = torch.cat([cur_g[:, :1], cur_g[:, :-1]], dim=1)
    pos = torch.arange(seq_len).expand(n_seq, -1)
    keep = pos >= 1
    if bos_token_id is not None:
        keep &= tokens != bos_token_id
    fold = (torch.arange(n_seq) % 2)[:, None].expand(-1, seq_len)
    if mechanism is not None:
        nxt = torch.cat([mechanism[:, 1:], torch.full_like(mechanism[:, :1], -1)], dim=1)
        # q[group, label] = P(label of t+1 | token group at t) on the kept positions (token-matched baseline)
        lab_ok = keep & (nxt >= 0)
        q = torch.zeros(n_groups + 1, n_labels, dtype=torch.float64)
        q.index_put_((cur_g[lab_ok], nxt[lab_ok]), torch.ones(int(lab_ok.sum()), dtype=torch.float64), accumulate=True)
        q = q / q.sum(1, keepdim=True).clamp(min=1)
        mass_tok = None

    moments = cur = prev = topk = None
    mass_next = mass_cur = None
    for lo, a in _batched(acts_fn, tokens, batch_size):
        sl = slice(lo, lo + a.shape[0])
        k = keep[sl].reshape(-1)
        flat = a.reshape(-1, a.shape[-1])
        if moments is None:
            d_sae = flat.shape[1]
            moments, cur, prev = FoldMoments(d_sae), GroupR2(n_groups, d_sae), GroupR2(n_groups, d_sae)
            topk = StreamingTopK(top_k, d_sae) if top_k else None
            if mechanism is not None:
                mass_next, mass_cur = LabelMass(n_labels, d_sae), LabelMass(n_labels, d_sae)
                mass_tok = torch.zeros(n_labels, d_sae, dtype=torch.float64)
        ak, fk = flat[k], fold[sl].reshape(-1)[k]
        moments.add(fk, ak)
        cur.add(fk, cur_g[sl].reshape(-1)[k], ak)
        prev.add(fk, prev_g[sl].reshape(-1)[k], ak)
        if mechanism is not None:
            mass_next.add(nxt[sl].reshape(-1)[k], ak)
            mass_cur.add(mechanism[sl].reshape(-1)[k], ak)
            lk = nxt[sl].reshape(-1)[k] >= 0  # the same positions LabelMass counts
            mass_tok += q[cur_g[sl].reshape(-1)[k][lk]].T @ ak[lk].double().clamp(min=0)
        if topk is not None:
            masked = flat.masked_fill(~k[:, None], float("-inf"))
            topk.add(masked, torch.arange(lo * seq_len, lo * seq_len + flat.shape[0]))

    r2c, r2p = cur.r2(moments), prev.r2(moments)
    n_kept = moments.n.sum()
    out = {
        "r2_current": r2c,
        "r2_previous": r2p,
        "r2_prev_minus_current": r2p.clamp(min=0) - r2c.clamp(min=0),
        "unexplained_by_token": 1 - r2c.clamp(0, 1),
        "mean_act": (moments.s1.sum(0) / n_kept).float(),
        "frac_active": (moments.active / n_kept).float(),
    }
    if mechanism is not None:
        out["gt_label"], out["gt_purity"] = mass_next.type_and_purity()
        out["gt_label_current"], out["gt_purity_current"] = mass_cur.type_and_purity()
        out["gt_mass"] = mass_next.mass.T.float()  # [d_sae, n_labels]
        share_tok = mass_tok / mass_tok.sum(0).clamp(min=1e-30)
        label = out["gt_label"]
        expected = share_tok.gather(0, label.clamp(min=0)[None]).squeeze(0)
        out["gt_token_lift"] = torch.where(label >= 0, out["gt_purity"].double() / expected.clamp(min=1e-12),
                                           torch.nan).float()
        lab = nxt[keep]
        out["gt_base_rate"] = torch.bincount(lab[lab >= 0], minlength=n_labels).float() / max(int((lab >= 0).sum()), 1)
    return out, topk


@dataclass
class ProbeResult:
    """Per-feature table, contexts for the browser, and per-snapshot score arrays."""

    table: pd.DataFrame
    """one row per feature: scores at `probe_step` (the feature's peak, or the final snapshot)"""
    contexts: dict[str, dict[str, list[dict]]]
    """`{"<feature>": {"<step>": [{"tokens", "highlight", "activation"}, ...]}}` (analysis/contexts.json)"""
    steps: list[int]
    """the probed snapshot steps, in the order of the per-snapshot arrays' second axis"""
    per_snapshot: dict[str, Tensor]
    """name -> `[d_sae, n_steps]` (`gt_mass`: `[d_sae, n_steps, n_labels]`)"""

    def save(self, analysis_dir) -> None:
        """Write `probe_scores.safetensors` (per-snapshot arrays + `steps`) and `contexts.json`."""
        from pathlib import Path

        d = Path(analysis_dir)
        tensors = {k: v.contiguous() for k, v in self.per_snapshot.items()}
        tensors["steps"] = torch.tensor(self.steps, dtype=torch.long)
        save_safetensors(d / "probe_scores.safetensors", tensors)
        write_json(d / "contexts.json", self.contexts)


def _decoder_norms(crosscoder) -> Tensor | None:
    if hasattr(crosscoder, "decoder_norms"):
        return crosscoder.decoder_norms().detach().float().cpu()
    if hasattr(crosscoder, "W_dec"):
        return crosscoder.W_dec.detach().float().norm(dim=-1).T.cpu()
    return None


def probe_features(
    crosscoder,
    snapshots: Iterable[tuple[int, object]],
    tokens: Int[Tensor, "n_seq seq_len"],
    hook: str,
    mechanism: Int[Tensor, "n_seq seq_len"] | None = None,
    steps_for_contexts: Sequence[int] | None = None,
    *,
    steps: Sequence[int] | None = None,
    cfg: ProbeConfig | None = None,
    tokenizer=None,
    bos_token_id: int | None = None,
    mechanism_names: Sequence[str] = MECHANISMS,
    probe_steps: Sequence[int] | None = None,
    pre_acts: PreActs | None = None,
) -> ProbeResult:
    """Probe every feature of `crosscoder` in each `(step, model)` snapshot on the stream `tokens`.

    `steps` are the crosscoder's source steps in source order (snapshot `step` is source
    `steps.index(step)`); without it the snapshots are taken to be the sources in order. `snapshots` must
    hold every source (the pre-activation is shared); `probe_steps` (default: all) are the ones scored. `tokens` rows start with BOS (its id, unless given, is `tokens[0, 0]`).
    Contexts are kept for `steps_for_contexts` (default: `cfg.n_context_steps` evenly spaced probed
    steps, the last included). One model is held at a time. `pre_acts`: the snapshots already encoded on (at least)
    `probe_token_sets` (`snapshot_acts.encode_token_sets`); then `snapshots` is not read.
    """
    cfg = cfg or ProbeConfig()
    tokens = tokens[: cfg.max_seqs].long().cpu()
    if mechanism is not None:
        mechanism = mechanism[: cfg.max_seqs].long().cpu()
        if mechanism.shape != tokens.shape:
            raise ValueError(f"mechanism labels {tuple(mechanism.shape)} do not match tokens {tuple(tokens.shape)}")
    bos = int(tokens[0, 0]) if bos_token_id is None else bos_token_id
    vocab = probe_vocab(tokens, bos)
    if pre_acts is None:  # the induction sequences need the models' context length: read off the first snapshot
        pre_acts = encode_token_sets(crosscoder, snapshots, lambda n_ctx: probe_token_sets(tokens, n_ctx, cfg, bos),
                                     hook, steps, cfg.batch_size, autocast=cfg.autocast)
    seq_len = induction_len(cfg, pre_acts.n_ctx, vocab)
    pre, ind_pre = pre_acts.of(tokens), pre_acts.of(induction_tokens(vocab, seq_len, cfg.induction_seqs, bos, cfg.seed))
    tok, all_steps = pre_acts.tokenizer, pre_acts.steps
    probe_at = list(probe_steps) if probe_steps is not None else all_steps
    decode = decoder_for(tokenizer or tok)

    done: list[int] = []
    per: dict[str, list[Tensor]] = {}
    topks: list[StreamingTopK | None] = []
    for step in progress_bar(probe_at, desc="probing snapshots", unit="snapshot"):
        if step not in all_steps:
            raise ValueError(f"probe step {step} is not one of the crosscoder's source steps {all_steps}")
        source = all_steps.index(step)
        scores, topk = stream_scores(
            SnapshotActs(crosscoder, pre, source), tokens, mechanism, bos, cfg.top_k, cfg.batch_size,
            cfg.max_groups, len(mechanism_names)
        )
        scores.update(induction_scores(SnapshotActs(crosscoder, ind_pre, source), vocab, seq_len,
                                       cfg.induction_seqs, bos, cfg.seed, cfg.batch_size))
        scores["source"] = torch.full_like(scores["mean_act"], source)
        for k, v in scores.items():
            per.setdefault(k, []).append(v)  # gt_base_rate is the same for every snapshot
        topks.append(topk)
        done.append(int(step))
    if not done:
        raise ValueError("probe_features got no snapshots")
    per_snapshot = {k: torch.stack(v, dim=1) for k, v in per.items() if k != "gt_base_rate"}

    # the snapshot each feature's table row describes
    d_sae = per_snapshot["mean_act"].shape[0]
    col = torch.full((d_sae,), len(done) - 1, dtype=torch.long)
    norms = _decoder_norms(crosscoder)
    if cfg.at == "peak" and norms is not None:
        col = norms[:, per_snapshot["source"][0].long()].argmax(dim=1)
    elif cfg.at not in ("peak", "final"):
        raise ValueError(f"ProbeConfig.at must be 'peak' or 'final', got {cfg.at!r}")
    rows = torch.arange(d_sae)

    def pick(name: str) -> np.ndarray:
        return per_snapshot[name][rows, col].numpy()

    table = pd.DataFrame({"feature": rows.numpy(), "probe_step": np.asarray(done)[col.numpy()]})
    for name in ("r2_prev_minus_current", "induction_contrast", "unexplained_by_token", "r2_current", "r2_previous",
                 "mean_act", "frac_active"):
        table[name] = pick(name)
    if mechanism is not None:
        names = np.asarray(list(mechanism_names) + ["none"], dtype=object)  # label -1 -> "none"
        table["gt_type"] = names[pick("gt_label").astype(int)]
        table["gt_purity"] = pick("gt_purity")
        # purity over the label's share of all (next-token) labelled positions: 1 = no preference
        base = per["gt_base_rate"][-1].numpy()
        label = pick("gt_label").astype(int)
        table["gt_lift"] = np.where(label >= 0, table["gt_purity"] / base[label], np.nan)
        table["gt_token_lift"] = pick("gt_token_lift")
        table["gt_type_current"] = names[pick("gt_label_current").astype(int)]
        table["gt_purity_current"] = pick("gt_purity_current")

    if steps_for_contexts is None:
        n = min(cfg.n_context_steps, len(done))
        steps_for_contexts = [done[int(round(j))] for j in np.linspace(len(done) - 1, 0, n)][::-1] if n else []
    contexts: dict[str, dict[str, list[dict]]] = {str(f): {} for f in range(d_sae)}
    for step in steps_for_contexts:
        if step not in done:
            raise ValueError(f"contexts asked for step {step}, which was not probed (probed: {done})")
        topk = topks[done.index(step)]
        if topk is None:
            continue
        for f, rows_f in contexts_from_topk(topk, tokens, decode, cfg.window_left, cfg.window_right).items():
            contexts[str(f)][str(step)] = rows_f
    return ProbeResult(table=table, contexts=contexts, steps=done, per_snapshot=per_snapshot)
