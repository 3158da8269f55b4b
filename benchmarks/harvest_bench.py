"""Harvest throughput as a ratio to the bare forward pass to the same layer, measured in the same run.

Bare forward: `model(tokens, stop_at_layer=L+1)` under no_grad over the same batches, for every model:
the least work any harvest must do. Harvest: `crosscoders.harvest.harvest` end to end (forward passes,
BOS exclusion, dtype cast, shards with sha256, manifest, normalisation scales) into a fresh store, for
both strategies; also the two ways of capturing the hook ("hooks" vs "cache"), the disk-free `stream`,
and the store reader's throughput.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crosscoders.harvest import harvest, model_acts, stream
from crosscoders.store import ActivationStore

from .common import best_time


@dataclass
class HarvestShape:
    n_models: int
    d_model: int
    n_layers: int
    layer: int
    n_seq: int
    seq_len: int
    d_vocab: int = 8192
    batch_size: int = 32


def neox_like(shape: HarvestShape, seed: int, device: torch.device) -> HookedTransformer:
    """A random GPT-NeoX-shaped model (parallel attention + MLP, rotary on 25% of head dims)."""
    n_heads = max(1, shape.d_model // 64)
    d_head = shape.d_model // n_heads
    cfg = HookedTransformerConfig(
        n_layers=shape.n_layers, d_model=shape.d_model, n_heads=n_heads, d_head=d_head, d_mlp=4 * shape.d_model,
        d_vocab=shape.d_vocab, n_ctx=shape.seq_len, act_fn="gelu", normalization_type="LN",
        positional_embedding_type="rotary", rotary_dim=max(2, d_head // 4), parallel_attn_mlp=True, seed=seed,
        device=str(device))
    return HookedTransformer(cfg).eval()


def harvest_cases(shape: HarvestShape, device: str = "cpu", repeats: int = 2) -> dict:
    dev = torch.device(device)
    models = [neox_like(shape, s, dev) for s in range(shape.n_models)]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, shape.d_vocab, (shape.n_seq, shape.seq_len), generator=g)
    tokens[:, 0] = 0
    hook = f"blocks.{shape.layer}.hook_resid_post"
    n_tok = shape.n_models * shape.n_seq * shape.seq_len  # token-forwards, the unit of all rates here

    @torch.no_grad()
    def bare() -> None:
        for m in models:
            for i in range(0, shape.n_seq, shape.batch_size):
                m(tokens[i:i + shape.batch_size].to(dev), stop_at_layer=shape.layer + 1)

    t_bare = best_time(bare, dev, repeats=repeats)
    out: dict = {"shape": vars(shape), "hook": hook, "bare_forward": {"seconds": t_bare, "tokens_per_s": n_tok / t_bare}}
    for method in ("hooks", "cache"):
        t = best_time(lambda method=method: [model_acts(m, tokens, [hook], shape.batch_size, method) for m in models],
                      dev, repeats=repeats)
        out[f"capture_{method}"] = {"seconds": t, "ratio_to_bare": t_bare / t}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("chunk", "snapshot"):
            loaders = models if strategy == "chunk" else [lambda m=m: m for m in models]
            runs = []
            for r in range(repeats):
                d = Path(tmp) / f"{strategy}{r}"
                t0 = time.perf_counter()
                store = harvest(loaders, tokens, hook, d, batch_size=shape.batch_size, strategy=strategy,
                                shard_seqs=max(1, shape.n_seq // 4), progress=False)
                runs.append(time.perf_counter() - t0)
            t = min(runs)
            out[f"harvest_{strategy}"] = {"seconds": t, "tokens_per_s": n_tok / t, "ratio_to_bare": t_bare / t,
                                          "store_mib": sum(s["bytes"] for s in store.manifest["shards"]) / 2**20}
        st = ActivationStore(store.dir)
        t0 = time.perf_counter()
        n = sum(len(b) for b in st.batches(1024, seed=0, n_epochs=1))
        t = time.perf_counter() - t0
        out["store_read"] = {"seconds": t, "rows_per_s": n / t, "note": "shuffled, sha256-checked, float32 out"}
    s = stream(models, tokens, hook, 1024, n_epochs=1, model_batch=shape.batch_size)
    t = best_time(lambda: sum(len(b) for b in s), dev, repeats=repeats, warmup=0)
    out["stream"] = {"seconds": t, "ratio_to_bare": t_bare / t}
    return out
