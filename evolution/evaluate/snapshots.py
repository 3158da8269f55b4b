"""Per-snapshot evaluation from the snapshots themselves: loss and KL to the corpus's n-gram statistics,
per held-out token, so the phase signals can resample tokens (or sequences) for their CIs.

Each snapshot runs (one model in memory at a time) on the first `n_seqs` rows of the corpus's held-out
`eval_tokens`. For every target x_t (t ≥ 1, BOS never a target) it records

- `nll`: −log p_s(x_t | x_<t), the snapshot's loss on that token;
- `kl_unigram`: KL(p_s(·|x_<t) ‖ q_1), with q_1(w) = (c(w)+α)/(N+αV) the add-α unigram distribution;
- `kl_bigram`: KL(p_s(·|x_<t) ‖ q_2(·|x_{t−1})), with q_2(w|v) = (c(v,w)+α)/(c(v,·)+αV) the add-α
  bigram distribution (`evolution.sources.references.bigram_table`; sparse, so a 50k vocabulary works).

The reference distributions are counted on the **train** tokens and evaluated on the held-out ones;
V is the model's output vocabulary (Pythia pads its unembedding beyond the tokenizer, and the KL needs
q > 0 wherever p > 0). α is `EvaluateConfig.alpha` (default 0.1, as the per-mechanism references).
The per-token held-out references (`bigram_nll`, `unigram_nll`: −log q of the actual target, with the
corpus's tokenizer vocabulary as V, the estimator of the loss figure's reference lines) are stored once.

Device and precision (`crosscoders.compute`): the logits never leave the device the snapshot runs on (the
snapshot source's, `[harvest] device`); the softmax, entropy and both KLs are computed there, in fp32 with
TF32 matmuls on CUDA and in fp64 on the CPU, and only the per-token values [n_tokens] come back.

KL(model ‖ bigram) is the statistical-phase probe of the papers: it falls while the model learns the
bigram statistics and rises again once the model uses more context than the previous token; where it
stops falling is "where the model stops tracking the bigram distribution" (`phases.signals.stops_tracking`).

Files (`eval/`, each written atomically): `step{N}.safetensors` (nll, kl_unigram, kl_bigram, entropy
`[n_tokens]` float32), one per snapshot so an interrupted stage resumes; `tokens.safetensors` (seq,
mechanism, bigram_nll, unigram_nll per token); `summary.json` (per-snapshot means, loss and both KLs per
planted mechanism, references, α, config hash).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from crosscoders.compute import model_device, release_memory, stat_dtype, tf32
from crosscoders.dataclass_cli import config_hash, to_dict
from crosscoders.io import save_safetensors, write_json
from crosscoders.progress import progress_bar
from evolution.sources.references import (
    bigram_table,
    expected_bigram_log_q,
    heldout_entropies,
    ngram_log_probs,
    unigram_log_probs_table,
)

PER_TOKEN = ("nll", "kl_unigram", "kl_bigram", "entropy")


@dataclass
class EvaluateConfig:
    """Per-snapshot evaluation on the held-out tokens (loss, KL to the unigram and bigram distributions)."""

    n_seqs: int | None = None
    """Held-out rows evaluated (None: every eval row of the corpus)."""
    batch_size: int = 16
    """Rows per forward pass (logits are [batch, seq_len, V] floats: lower it for a 50k vocabulary)."""
    alpha: float = 0.1
    """Add-α smoothing of the unigram / bigram reference distributions, counted on the train tokens."""
    resume: bool = True
    """Keep snapshots already evaluated under the same config and corpus."""


def token_metrics(
    logits: Float[Tensor, "b s V"], tokens: Int[Tensor, "b s"], log_q1: Float[Tensor, " V"], table: dict
) -> dict[str, Float[Tensor, "b s_minus_1"]]:
    """Per target position (1..s−1): nll, KL to the unigram and bigram references, the model's entropy.

    Computed on `logits`' device (`log_q1` and `table` must live there too) in `stat_dtype` of it."""
    logp = torch.log_softmax(logits[:, :-1].to(stat_dtype(logits.device)), -1)
    p = logp.exp()
    tokens = tokens.to(logits.device)
    tgt, ctx = tokens[:, 1:], tokens[:, :-1]
    neg_h = (p * logp).sum(-1)
    flat_p = p.reshape(-1, p.shape[-1])
    e_log_q2 = expected_bigram_log_q(flat_p, ctx.reshape(-1), table).reshape(tgt.shape)
    return {"nll": -logp.gather(-1, tgt[..., None])[..., 0], "kl_unigram": neg_h - p @ log_q1.to(p.dtype),
            "kl_bigram": neg_h - e_log_q2, "entropy": -neg_h}


def _logits(model, batch: Tensor) -> Tensor:
    out = model(batch)
    return out.logits if hasattr(out, "logits") else out


def evaluate_snapshot(model, tokens: Int[Tensor, "n s"], keep: Tensor, log_q1: Tensor, table: dict,
                      batch_size: int = 16) -> dict[str, Tensor]:
    """Every per-token value of one model on `tokens`, flattened over the kept (non-BOS) targets, float32
    on the CPU (the logits and the statistics stay on the model's device)."""
    device = model_device(model)
    log_q1 = log_q1.to(device)
    table = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in table.items()}
    keep = keep.to(device)
    parts: dict[str, list[Tensor]] = {k: [] for k in PER_TOKEN}
    with torch.no_grad(), tf32(device):
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size].to(device)
            vals = token_metrics(_logits(model, batch), batch, log_q1, table)
            for k in PER_TOKEN:
                parts[k].append(vals[k][keep[start : start + batch_size]].float())
    return {k: torch.cat(v).cpu() for k, v in parts.items()}


def _summary_row(step: int, vals: dict[str, Tensor], mech: Tensor | None, names: Sequence[str] | None) -> dict:
    row = {"step": int(step), **{k: float(vals[k].double().mean()) for k in PER_TOKEN}}
    if mech is not None and names:
        # per planted mechanism: its loss and how far the model's distribution on its tokens is from the
        # unigram / bigram distributions (copy tokens should leave the bigram distribution once copying is learned)
        for key, metric in (("loss_by_mechanism", "nll"), ("kl_unigram_by_mechanism", "kl_unigram"),
                            ("kl_bigram_by_mechanism", "kl_bigram")):
            row[key] = {n: float(vals[metric][mech == i].double().mean()) for i, n in enumerate(names)
                        if bool((mech == i).any())}
    return row


def evaluate_snapshots(
    run_dir: str | Path, steps: Sequence[int], loaders: Sequence[Callable[[], torch.nn.Module]],
    cfg: EvaluateConfig | None = None,
) -> dict:
    """Evaluate each snapshot (`loaders[i]()` builds step `steps[i]`'s model, one in memory at a time) on
    the run's held-out tokens; write `eval/` (module docstring) and return `summary.json`'s content."""
    from evolution.sources.corpus import Corpus

    cfg = cfg or EvaluateConfig()
    run_dir, out = Path(run_dir), Path(run_dir) / "eval"
    corpus = Corpus.load(run_dir / "corpus")
    tokens = corpus.eval_tokens[: cfg.n_seqs] if cfg.n_seqs else corpus.eval_tokens
    bos, names = corpus.bos_token_id, corpus.mechanism_names
    keep = tokens[:, 1:] != bos
    mech = corpus.eval_mechanism[: len(tokens), 1:][keep] if corpus.eval_mechanism is not None else None
    key = config_hash({"cfg": {k: v for k, v in to_dict(cfg).items() if k not in ("batch_size", "resume")},
                       "tokens": int(tokens.sum()), "shape": list(tokens.shape), "train": int(corpus.tokens.sum())})
    old = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    rows = {r["step"]: r for r in old.get("per_snapshot", [])} if cfg.resume and old.get("config_hash") == key else {}
    rows = {s: r for s, r in rows.items() if (out / f"step{s}.safetensors").exists()}
    refs = {**heldout_entropies(corpus.tokens, tokens, cfg.alpha, corpus.vocab_size, bos),
            "unigram_entropy": corpus.unigram_entropy, "bigram_entropy": corpus.bigram_entropy}
    per_token_refs = {f"{n}_nll": -ngram_log_probs(corpus.tokens, tokens, o, cfg.alpha, corpus.vocab_size, bos)[keep]
                      for n, o in (("unigram", 1), ("bigram", 2))}
    seq = torch.arange(len(tokens))[:, None].expand_as(keep)[keep]
    save_safetensors(out / "tokens.safetensors", {"seq": seq, **({"mechanism": mech} if mech is not None else {}),
                                                  **{k: v.float() for k, v in per_token_refs.items()}})

    def write(complete: bool) -> dict:
        summary = {"steps": sorted(rows), "per_snapshot": [rows[s] for s in sorted(rows)], "references": refs,
                   "alpha": cfg.alpha, "n_tokens": int(keep.sum()), "n_seqs": len(tokens), "mechanism_names": names,
                   "config": to_dict(cfg), "config_hash": key, "complete": complete}
        write_json(out / "summary.json", summary)
        return summary

    todo = [(s, load) for s, load in zip(steps, loaders, strict=True) if s not in rows]
    tables: dict[int, tuple[Tensor, dict]] = {}
    for step, load in progress_bar(todo, desc="evaluate", unit="snapshot"):
        model = load()
        V = int(getattr(getattr(model, "cfg", None), "d_vocab_out", 0) or 0) or int(_logits(model, tokens[:1, :2].to(model_device(model))).shape[-1])
        if V not in tables:  # reference distributions over the model's output vocabulary
            tables[V] = (unigram_log_probs_table(corpus.tokens, V, cfg.alpha, bos), bigram_table(corpus.tokens, V, cfg.alpha, bos))
        vals = evaluate_snapshot(model, tokens, keep, *tables[V], batch_size=cfg.batch_size)
        dev = model_device(model)
        del model
        release_memory(dev)
        save_safetensors(out / f"step{step}.safetensors", vals)
        rows[step] = _summary_row(step, vals, mech, names)
        write(complete=False)
    return write(complete=True)


def read_eval(run_dir: str | Path) -> dict | None:
    """`eval/` as arrays: per-token `[n_tokens, n_snapshots]` matrices (nll, kl_unigram, kl_bigram,
    entropy), the per-token references, `seq` (row of each token) and the summary; None if absent."""
    out = Path(run_dir) / "eval"
    if not (out / "summary.json").exists():
        return None
    from safetensors.torch import load_file

    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    if not steps:
        return None
    per_step = [load_file(str(out / f"step{s}.safetensors")) for s in steps]
    data = {k: np.stack([p[k].numpy() for p in per_step], 1).astype(np.float64) for k in PER_TOKEN}
    tok = {k: v.numpy() for k, v in load_file(str(out / "tokens.safetensors")).items()}
    return {"steps": steps, "summary": summary, **data, **tok}


def per_sequence(values: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Mean over each sequence's tokens: `[n_tokens, S]` → `[n_seqs, S]` (the resampling unit for CIs:
    tokens of one row are correlated, so resampling tokens would understate the spread)."""
    _, inv, counts = np.unique(seq, return_inverse=True, return_counts=True)
    sums = np.zeros((len(counts), values.shape[1]))
    np.add.at(sums, inv, values)
    return sums / counts[:, None]


def evaluate_stage(ctx) -> None:
    """The evaluate stage: each snapshot on the held-out tokens through the run's snapshot source (pretrain,
    local:, hf:), then the loss panel (the pre-training log where there is one, else these held-out losses)."""
    from evolution.sources.learning import save_loss_figure

    ctx.source.check_corpus(ctx.corpus)  # before any model runs
    evaluate_snapshots(ctx.run_dir, ctx.steps, ctx.loaders(), ctx.cfg.evaluate)
    save_loss_figure(ctx.run_dir)
