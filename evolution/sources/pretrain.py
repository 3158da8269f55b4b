"""Pre-train a small GPT-NeoX ("mini-Pythia") and save snapshots on a Pythia-like schedule.

The model is Hugging Face's `GPTNeoXForCausalLM` configured as Pythia (Biderman et al. 2023): parallel
attention + MLP, rotary embeddings on 25% of each head's dims, untied embeddings; trained with Pythia's
recipe: AdamW β=(0.9, 0.95), linear warm-up over 1% of steps, cosine decay to 0.1× peak, weight decay
0.1 (not on biases and LayerNorm gains, as GPT-NeoX does), gradient clipping at 1.0.

Resumability: the batch at step t is a pure function of (seed, t) (`batch_indices`), so the only
state is model + optimiser + scheduler + RNG + step, saved atomically to `pretrain/state.pt`
periodically and at every snapshot. A resumed run ends in the same weights as an uninterrupted one.
Snapshots are written to a temporary directory and renamed into place, so a crash never leaves a
half-written `step{N}/`; log rows written after the last saved state are dropped on resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from crosscoders.dataclass_cli import config_hash, to_dict
from crosscoders.io import append_jsonl, read_jsonl, torch_save, write_json, write_text
from crosscoders.precision import describe, resolve_autocast
from crosscoders.progress import progress_bar
from crosscoders.train import warmup_decay
from evolution.sources.snapshots import pythia_like_schedule

PRESETS: dict[str, dict[str, int]] = {
    # CPU default: ~16k tok/s on 2 cores (DESIGN.md), enough for the planted corpus's mechanisms.
    "mini": dict(d_model=128, n_layers=2, n_heads=4, d_mlp=512),
    # EleutherAI/pythia-14m's shape (n_ctx comes from the corpus unless set).
    "pythia-14m": dict(d_model=128, n_layers=6, n_heads=4, d_mlp=512),
}


@dataclass
class ModelConfig:
    """GPT-NeoX shape. Fields left at None take the preset's value (n_ctx: the corpus's seq_len)."""

    preset: Literal["mini", "pythia-14m"] = "mini"
    """Named shape: "mini" (2 layers × 128, CPU default) or "pythia-14m" (6 layers × 128, 4 heads)."""
    d_model: int | None = None
    """Residual stream width (overrides the preset)."""
    n_layers: int | None = None
    """Number of transformer blocks (overrides the preset)."""
    n_heads: int | None = None
    """Attention heads per block (overrides the preset)."""
    d_mlp: int | None = None
    """MLP hidden width (overrides the preset)."""
    n_ctx: int | None = None
    """Context length (max positions); None: the corpus's sequence length."""
    rotary_pct: float = 0.25
    """Fraction of each head's dims that get rotary embeddings (Pythia: 0.25)."""

    def resolved(self, seq_len: int) -> ModelConfig:
        p = PRESETS[self.preset]
        pick = lambda name: getattr(self, name) if getattr(self, name) is not None else p[name]  # noqa: E731
        return ModelConfig(
            preset=self.preset, d_model=pick("d_model"), n_layers=pick("n_layers"), n_heads=pick("n_heads"),
            d_mlp=pick("d_mlp"), n_ctx=self.n_ctx or seq_len, rotary_pct=self.rotary_pct,
        )


@dataclass
class PretrainConfig:
    """Mini-Pythia pre-training: model shape, Pythia's optimiser recipe, snapshot schedule."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (on the command line: --preset, --d-model, --n-layers, ... flattened)."""
    steps: int = 1500
    """Optimiser steps (default: 3.1M tokens, measured ~2.4 min on one CPU core at ~22k tok/s)."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate (pythia-14m: 1e-3)."""
    warmup_frac: float = 0.01
    """Fraction of steps of linear warm-up (Pythia: 1%)."""
    min_lr_frac: float = 0.1
    """Cosine decay ends at this fraction of the peak learning rate (Pythia: 0.1)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not biases or LayerNorm gains)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam (β1, β2) (Pythia: 0.9, 0.95)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value."""
    n_linear_snapshots: int = 12
    """Evenly spaced snapshots after the log-spaced head 0, 1, 2, 4, ... (see pythia_like_schedule)."""
    snapshot_steps: list[int] | None = None
    """Explicit snapshot steps (overrides the schedule), e.g. "0,10,100"."""
    eval_every: int = 25
    """Evaluate about every this many steps (log-spaced early, like the snapshots, and at each snapshot)."""
    eval_max_seqs: int = 256
    """Evaluate on at most this many held-out sequences."""
    checkpoint_every: int = 100
    """Save the resume state every this many steps (and at every snapshot)."""
    seed: int = 0
    """Seed of the initialisation and the data order."""
    nonlinearity_reg: float = 0.0
    """λ of the nonlinearity regulariser (Razzhigaev et al. 2024): λ · mean cosine between consecutive
    layers' embeddings added to the loss (`evolution.sources.regularizer`); 0 = plain Pythia recipe."""
    device: str = "cpu"
    """torch device."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: bfloat16 runs the forward pass under autocast (weights stay float32); "auto" picks
    bfloat16 only where a measured probe finds it faster on this device (crosscoders/precision.py)."""


def compute_dtype(cfg: PretrainConfig) -> str:
    """"float32" or "bfloat16": `cfg.dtype`, with "auto" decided by measurement on `cfg.device`."""
    mode = {"auto": "auto", "float32": "none", "bfloat16": "bf16"}[cfg.dtype]
    return "bfloat16" if resolve_autocast(mode, cfg.device) == "bf16" else "float32"


def snapshot_schedule(cfg: PretrainConfig) -> list[int]:
    if cfg.snapshot_steps is not None:
        bad = [s for s in cfg.snapshot_steps if not 0 <= s <= cfg.steps]
        if bad:
            raise ValueError(f"snapshot_steps {bad} outside [0, steps={cfg.steps}]")
        return sorted(set(cfg.snapshot_steps))
    return pythia_like_schedule(cfg.steps, cfg.n_linear_snapshots)


def eval_schedule(cfg: PretrainConfig) -> list[int]:
    n = max(1, cfg.steps // max(1, cfg.eval_every))
    return sorted(set(pythia_like_schedule(cfg.steps, n)) | set(snapshot_schedule(cfg)))


def build_model(mcfg: ModelConfig, vocab_size: int, bos_token_id: int):
    """A Pythia-style `GPTNeoXForCausalLM` with the given (resolved) shape."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if mcfg.d_model % mcfg.n_heads:
        raise ValueError(f"d_model={mcfg.d_model} is not divisible by n_heads={mcfg.n_heads}")
    hf_cfg = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=mcfg.d_model, num_hidden_layers=mcfg.n_layers,
        num_attention_heads=mcfg.n_heads, intermediate_size=mcfg.d_mlp, max_position_embeddings=mcfg.n_ctx,
        rotary_pct=mcfg.rotary_pct, rotary_emb_base=10000, use_parallel_residual=True,
        tie_word_embeddings=False, hidden_act="gelu", layer_norm_eps=1e-5, initializer_range=0.02,
        attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=bos_token_id, eos_token_id=bos_token_id,
    )
    return GPTNeoXForCausalLM(hf_cfg)


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig):
    """AdamW with decay on matrices only (GPT-NeoX exempts biases and LayerNorm), Pythia's LR schedule."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=1e-8,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, cfg))
    return opt, sched


def lr_factor(t: int, cfg: PretrainConfig) -> float:
    """Pythia's schedule for update t (0-based): linear warm-up, then cosine to min_lr_frac."""
    warmup = max(1, round(cfg.warmup_frac * cfg.steps))
    return warmup_decay(t, cfg.steps, warmup, warmup, cfg.min_lr_frac, "cosine")


def batch_indices(seed: int, step: int, batch_size: int, n_seq: int) -> Int[Tensor, " batch"]:
    """Rows of the training set used at update `step` (0-based): a pure function of (seed, step).

    Epoch e visits the rows in a permutation seeded by (seed, e); the global sample counter
    step·batch_size + j picks its epoch and position, so no iterator state needs saving."""
    start = step * batch_size
    out, cache = [], {}
    for k in range(start, start + batch_size):
        epoch, pos = divmod(k, n_seq)
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n_seq, generator=g)
        out.append(cache[epoch][pos])
    return torch.stack(out)


def keyed_config(cfg: PretrainConfig) -> dict:
    """The config as hashed for caching / resume: options at their "off" value are left out, so adding an
    option does not invalidate runs made before it existed."""
    d = to_dict(cfg)
    if not d.get("nonlinearity_reg"):
        d.pop("nonlinearity_reg", None)
    return d


def token_losses(model, tokens: Int[Tensor, "batch seq"], dtype: str = "float32") -> Float[Tensor, "batch seq_m1"]:
    """Per-token next-token cross-entropy (nats) for targets tokens[:, 1:]."""
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        logits = model(input_ids=tokens).logits[:, :-1]
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1
    )


@torch.no_grad()
def evaluate(model, corpus, cfg: PretrainConfig, dtype: str = "float32") -> dict:
    """Mean eval loss over target tokens (BOS targets excluded) and, on the planted corpus, per mechanism."""
    model.eval()
    toks = corpus.eval_tokens[: cfg.eval_max_seqs].to(cfg.device)
    mech = corpus.eval_mechanism[: cfg.eval_max_seqs] if corpus.eval_mechanism is not None else None
    losses = torch.cat([token_losses(model, toks[i : i + 64], dtype) for i in range(0, len(toks), 64)]).cpu()
    keep = toks[:, 1:].cpu() != corpus.bos_token_id
    row = {"eval_loss": float(losses[keep].mean())}
    if mech is not None and corpus.mechanism_names:
        labels = mech[:, 1:]
        row["eval_loss_by_mechanism"] = {
            name: float(losses[(labels == k) & keep].mean())
            for k, name in enumerate(corpus.mechanism_names)
            if ((labels == k) & keep).any()
        }
    model.train()
    return row


def save_snapshot(model, tokenizer, root: Path, step: int) -> Path:
    """Write `root/step{N}/` (safetensors + config + tokenizer) via a temp dir renamed into place."""
    from transformers.utils import logging as hf_logging

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step{step}.", suffix=".tmp", dir=root))
    try:
        hf_logging.disable_progress_bar()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if final.exists():  # a rewrite after resuming: identical weights, replace the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])


def _vocab_size(corpus) -> int:
    top = int(max(corpus.tokens.max(), corpus.eval_tokens.max())) + 1
    return max(len(corpus.tokenizer), top)


def pretrain(cfg: PretrainConfig, corpus, out_dir: str | Path, *, stop_after: int | None = None) -> list[int]:
    """Train on `corpus.tokens`, write `out_dir/snapshots/step{N}/` and `out_dir/pretrain/`; return the
    snapshot steps saved. Resumes from `out_dir/pretrain/state.pt` when present.

    `stop_after=k` returns right after update k without saving anything further, like a kill (tests)."""
    out_dir = Path(out_dir)
    pdir, sdir = out_dir / "pretrain", out_dir / "snapshots"
    pdir.mkdir(parents=True, exist_ok=True)
    mcfg = cfg.model.resolved(corpus.tokens.shape[1])
    resolved = {**keyed_config(cfg), "model": to_dict(mcfg), "vocab_size": _vocab_size(corpus)}
    key = config_hash(resolved)
    dtype = compute_dtype(cfg)
    resolved["precision"] = describe(cfg.dtype, "bf16" if dtype == "bfloat16" else "none", cfg.device)
    snaps, evals = set(snapshot_schedule(cfg)), set(eval_schedule(cfg))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(mcfg, resolved["vocab_size"], corpus.bos_token_id).to(cfg.device)
    opt, sched = make_optimizer(model, cfg)
    step, elapsed = 0, 0.0
    state_path, log_path = pdir / "state.pt", pdir / "log.jsonl"
    if state_path.exists():
        state = torch.load(state_path, map_location=cfg.device, weights_only=False)
        if state["config_hash"] != key:
            raise ValueError(
                f"{state_path} was written by a different pre-training config ({pdir / 'config.json'}); "
                "delete it (or the run directory) to start over"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed"]
        # rows logged after the saved state will be logged again: drop them (atomic rewrite)
        rows = [r for r in read_jsonl(log_path) if r["step"] <= step]
        write_text(log_path, "".join(json.dumps(r) + "\n" for r in rows))
    else:
        write_text(log_path, "")
    write_json(pdir / "config.json", resolved)

    def save_state() -> None:
        torch_save(state_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": _rng_state(), "step": step, "data_position": step * cfg.batch_size,
            "elapsed": elapsed, "config_hash": key,
        })

    def at_step_end() -> None:  # weights now are "after `step` updates"
        if step in evals:
            append_jsonl(log_path, {"step": step, **evaluate(model, corpus, cfg, dtype)})
        if step in snaps:
            save_snapshot(model, corpus.tokenizer, sdir, step)
        if step in snaps or step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_state()

    model.train()
    if step == 0:
        at_step_end()
    n_seq, seq_len = corpus.tokens.shape
    bar = progress_bar(total=cfg.steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    while step < cfg.steps:
        idx = batch_indices(cfg.seed, step, cfg.batch_size, n_seq)
        tokens = corpus.tokens[idx].to(cfg.device)
        if cfg.nonlinearity_reg:
            from evolution.sources.regularizer import regularised_loss

            total, loss, reg_cos = regularised_loss(model, tokens, corpus.bos_token_id, cfg.nonlinearity_reg, dtype)
        else:
            losses = token_losses(model, tokens, dtype)
            total = loss = losses[tokens[:, 1:] != corpus.bos_token_id].mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        step += 1
        elapsed = time.perf_counter() - t0
        tokens_seen = step * cfg.batch_size * seq_len
        row = {"step": step, "lr": lr, "train_loss": loss.item(), "tokens_seen": tokens_seen}
        if cfg.nonlinearity_reg:  # train_loss stays the LM loss, comparable between runs
            row["reg_cos"] = reg_cos.item()
        append_jsonl(log_path, row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
        if stop_after is not None and step >= stop_after and step < cfg.steps:
            bar.close()
            return [s for s in sorted(snaps) if s <= step]
        at_step_end()
    bar.close()
    write_json(pdir / "summary.json", {
        "steps": cfg.steps, "seconds": round(elapsed, 2), "tokens_seen": cfg.steps * cfg.batch_size * seq_len,
        "tokens_per_second": round(cfg.steps * cfg.batch_size * seq_len / max(elapsed, 1e-9), 1),
        "snapshot_steps": sorted(snaps), "n_params": sum(p.numel() for p in model.parameters()),
    })
    return sorted(snaps)


def run_pretrain(run_dir: str | Path, cfg: PretrainConfig) -> list[int]:
    """The `feature-evolution pretrain` verb: read `run_dir/corpus/`, train, write into `run_dir`."""
    from evolution.sources.corpus import Corpus

    corpus_dir = Path(run_dir) / "corpus"
    if not corpus_dir.exists():
        raise FileNotFoundError(f"{corpus_dir} not found: build the corpus first (feature-evolution corpus)")
    return pretrain(cfg, Corpus.load(corpus_dir), run_dir)
