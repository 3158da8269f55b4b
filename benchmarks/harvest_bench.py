"""Harvest throughput as a ratio to the bare forward pass to the same layer, measured in the same run.

Bare forward: `model(tokens, stop_at_layer=L+1)` under no_grad over the same batches, for every model:
the least work any harvest must do. Harvest: `crosscoders.harvest.harvest` end to end (forward passes,
BOS exclusion, dtype cast, shards with sha256, manifest, normalisation scales) into a fresh store, for
both strategies; also the two ways of capturing the hook ("hooks" vs "cache"), and the store reader's
throughput (the disk-free stream has its own benchmark, stream_bench.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crosscoders.harvest import harvest, model_acts
from crosscoders.store import ActivationStore

from .common import PeakMemory, interleaved_best


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

    def capture(method: str) -> None:
        for m in models:
            model_acts(m, tokens, [hook], shape.batch_size, method)

    tmp = tempfile.TemporaryDirectory()
    runs = iter(range(10**6))

    def harvest_once(strategy: str) -> None:
        loaders = models if strategy == "chunk" else [lambda m=m: m for m in models]
        harvest(loaders, tokens, hook, Path(tmp.name) / f"{strategy}{next(runs)}", batch_size=shape.batch_size,
                strategy=strategy, progress=False)  # default ~64 MiB shards

    cases = {"bare_forward": bare, "capture_hooks": lambda: capture("hooks"),
             "capture_cache": lambda: capture("cache"), "harvest_chunk": lambda: harvest_once("chunk"),
             "harvest_snapshot": lambda: harvest_once("snapshot")}
    # Interleaved repeats, best of each: on a shared machine load drifts, and every case should see
    # the same conditions as the bare forward pass it is compared with.
    bare()  # warm-up
    best = interleaved_best(cases, dev, repeats)
    t_bare = best["bare_forward"]
    out: dict = {"shape": vars(shape), "hook": hook, "repeats": repeats, "token_forwards": n_tok}
    for k, t in best.items():
        out[k] = {"seconds": t, "tokens_per_s": n_tok / t, "ratio_to_bare": t_bare / t}
    st = ActivationStore(next(Path(tmp.name).glob("chunk*")))
    out["harvest_chunk"]["store_mib"] = sum(x["bytes"] for x in st.manifest["shards"]) / 2**20
    t0 = time.perf_counter()
    n = sum(len(b) for b in st.batches(1024, seed=0, n_epochs=1))
    t = time.perf_counter() - t0
    out["store_read"] = {"seconds": t, "rows_per_s": n / t, "note": "shuffled, sha256-checked, float32 out"}
    tmp.cleanup()
    return out


def harvest_memory_case(shape: HarvestShape, lazy: bool, device: str = "cpu") -> dict:
    """Peak memory of one harvest: `lazy` = loaders that build each model on call (strategy "snapshot",
    one model alive at a time) vs every model built up front (strategy "chunk")."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, shape.d_vocab, (shape.n_seq, shape.seq_len), generator=g)
    hook = f"blocks.{shape.layer}.hook_resid_post"
    with PeakMemory(dev) as mem, tempfile.TemporaryDirectory() as tmp:
        loaders = [lambda s=s: neox_like(shape, s, dev) for s in range(shape.n_models)]
        models = loaders if lazy else [f() for f in loaders]
        t0 = time.perf_counter()
        store = harvest(models, tokens, hook, tmp, batch_size=shape.batch_size, progress=False)
        seconds = time.perf_counter() - t0
        store_mib = sum(s["bytes"] for s in store.manifest["shards"]) / 2**20
    params = sum(p.numel() for p in neox_like(shape, 0, torch.device("meta")).parameters())
    return {"strategy": "snapshot" if lazy else "chunk", "lazy_loaders": lazy, "seconds": seconds,
            "model_mib": params * 4 / 2**20, "store_mib": store_mib, "memory": mem.as_dict()}


def harvest_memory_isolated(shape: HarvestShape, lazy: bool, device: str) -> dict:
    args = json.dumps({"shape": vars(shape), "lazy": lazy, "device": device})
    out = subprocess.run([sys.executable, "-m", "benchmarks.harvest_bench", args], capture_output=True, text=True)
    if out.returncode:
        return {"lazy_loaders": lazy, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    print(json.dumps(harvest_memory_case(HarvestShape(**a["shape"]), a["lazy"], a["device"])))
