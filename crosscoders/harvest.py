"""Run one token stream through every snapshot, at one or more hooks, into an activation store.

    harvest(models, tokens, "blocks.3.hook_resid_post", out_dir)  ->  ActivationStore

(Training straight from the models, with no store, is `crosscoders.stream.ShuffleStream`.)

`models` is a sequence of transformer-lens `HookedTransformer`s, or of zero-argument callables that
load one (e.g. `functools.partial(load_local_snapshot, path)`), so that only one model is in memory.
Each forward pass stops after the hook's layer (`stop_at_layer=L+1` for `blocks.L.*`): the layers
above it are never computed.

Memory stays bounded although the store is laid out `[tokens, n_sources, d_in]` while a harvest goes
model by model. The token stream is cut into chunks of `shard_seqs` sequences, one chunk = one shard.
  * strategy "chunk" (default when every model is already in memory): for each chunk, run every model
    and write the stacked shard. Peak memory: the models plus one shard. No temporary files.
  * strategy "snapshot" (default for lazy loaders): load each model once, run every chunk through it
    and write per-source temporary parts `<store>/.parts/`; then a merge pass stacks the parts of each
    chunk into its shard and deletes them. Peak memory: one model plus one shard; peak extra disk
    about one store.
Both give byte-identical stores. Processes (torchrun ranks) share a "snapshot" harvest: each writes the
parts of its own snapshots, one of them merges (`own`, `merge`, `wait`). Resumable: the store's manifest lists complete shards (the writer is
atomic) and parts are written atomically, so a rerun skips every finished chunk and every finished
part. Positions excluded by default: position 0 of each sequence (BOS) and any `bos_token_id` /
`pad_token_id` token (pad on the right: the model is causal, so right padding does not change the
real tokens' activations).
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file
from torch import Tensor, nn

from .io import save_safetensors
from .precision import autocast_context, resolve_autocast
from .progress import progress_bar
from .store import DTYPES, MANIFEST, ActivationStore, StoreWriter, _read_manifest, tokens_sha256

ModelLike = nn.Module | Callable[[], nn.Module]
PARTS = ".parts"


def hook_layer(hook: str) -> int | None:
    """The block index L of a `blocks.L.*` hook name (TransformerLens naming), else None."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else None


def stop_layer(hook: str) -> int | None:
    """`stop_at_layer` that still computes `hook`: L+1 for `blocks.L.*`, 0 for the embeddings, else None."""
    if (layer := hook_layer(hook)) is not None:
        return layer + 1
    return 0 if hook in ("hook_embed", "hook_pos_embed") else None


def keep_mask(tokens: Int[Tensor, "n_seq seq_len"], exclude_bos: bool = True, bos_token_id: int | None = None,
              pad_token_id: int | None = None) -> Bool[Tensor, "n_seq seq_len"]:
    """Positions whose activations are stored."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    if exclude_bos:
        keep[:, 0] = False  # every row starts with BOS (corpus contract), an attention sink with a huge norm
        if bos_token_id is not None:
            keep &= tokens != bos_token_id
    if pad_token_id is not None:
        keep &= tokens != pad_token_id
    return keep


def _load(m: ModelLike) -> nn.Module:
    return m if isinstance(m, nn.Module) else m()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def model_acts(model: nn.Module, tokens: Int[Tensor, "n_seq seq_len"], hooks: Sequence[str],
               batch_size: int = 32, method: str = "cache",
               autocast: str = "none") -> dict[str, Float[Tensor, "n_seq seq_len d_in"]]:
    """Activations of `hooks` on `tokens`, `batch_size` sequences per forward pass stopped at the last
    hook's layer. `method`: "cache" (`run_with_cache(names_filter=hooks)`) or "hooks" (`run_with_hooks` with
    a saving hook). Same values. Speed relative to the bare forward over four CPU runs of
    benchmarks/harvest_bench.py (d_model 256): "cache" 0.99-1.09x, "hooks" 0.83-1.06x; so "cache".
    `autocast`: "auto" / "none" / "bf16" for the forward passes (crosscoders/precision.py)."""
    stops = [stop_layer(h) for h in hooks]
    stop = None if None in stops else max(stops)
    dev = _device(model)
    amp = autocast_context(resolve_autocast(autocast, dev), dev)
    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for i in range(0, tokens.shape[0], batch_size):
        t = tokens[i:i + batch_size].to(dev)
        if method == "cache":
            with amp:
                _, cache = model.run_with_cache(t, names_filter=list(hooks), stop_at_layer=stop)
            got = {h: cache[h] for h in hooks}
        elif method == "hooks":
            got = {}

            def save(act: Tensor, hook, got=got) -> None:
                got[hook.name] = act.detach()

            with amp:
                model.run_with_hooks(t, fwd_hooks=[(h, save) for h in hooks], stop_at_layer=stop)
        else:
            raise ValueError(f"method must be 'hooks' or 'cache', got {method!r}")
        for h in hooks:
            out[h].append(got[h].float().cpu())
    return {h: torch.cat(v) for h, v in out.items()}


def measure_scales(batches: Iterable[Float[Tensor, "batch n_sources d_in"]],
                   max_tokens: int = 65536) -> Float[Tensor, " n_sources"]:
    """Per-source scale sqrt(d_in) / E|x_s| on the first `max_tokens` rows of raw activations."""
    total, n = None, 0
    for x in batches:
        x = x[: max_tokens - n].float()
        s = x.norm(dim=-1).sum(0)
        total = s if total is None else total + s
        n += x.shape[0]
        if n >= max_tokens:
            break
    if not n:
        raise ValueError("measure_scales: no activations")
    return (math.sqrt(x.shape[-1]) / (total / n).clamp(min=1e-12)).float()


def _store_dirs(hooks: Sequence[str], out_dir: Path, single: bool) -> dict[str, Path]:
    return {hooks[0]: out_dir} if single else {h: out_dir / h for h in hooks}


def _stored_chunks(d: Path, seq_len: int, shard_seqs: int) -> tuple[int, bool]:
    """(first chunk without a shard, complete) of the store at `d` as its manifest says (0, False if none)."""
    if not (d / MANIFEST).exists():
        return 0, False
    m = _read_manifest(d / MANIFEST)  # a corrupt manifest is a clear StoreError, not a KeyError
    last = max((s["last_position"] for s in m["shards"]), default=-1)
    return (0 if not m["shards"] else (last // seq_len) // shard_seqs + 1), bool(m.get("complete"))


def harvest(models: Sequence[ModelLike], tokens: Int[Tensor, "n_seq seq_len"], hook: str | Sequence[str],
            out_dir: str | Path, sources: Sequence[str] | None = None, batch_size: int = 32,
            exclude_bos: bool = True, resume: bool = True, *, dtype: str = "bfloat16",
            shard_seqs: int | None = None, bos_token_id: int | None = None, pad_token_id: int | None = None,
            strategy: str = "auto", method: str = "cache", metadata: dict | None = None,
            progress: bool = True, autocast: str = "auto", own: Sequence[int] | None = None,
            merge: bool = True, wait: Callable[[], None] = lambda: None) -> ActivationStore | dict[str, ActivationStore] | None:
    """Harvest `hook` of every model on `tokens` into a store at `out_dir` (one hook), or into
    `out_dir/<hook>/` for each of several hooks (one forward pass per model and chunk serves them all).

    `batch_size`: sequences per forward pass. `shard_seqs`: sequences per shard (default: ~64 MiB
    shards). `sources`: names in the manifest (default source0, source1, ...). `autocast`: precision of the
    forward passes ("auto": bf16 only where measured faster, crosscoders/precision.py).

    Several processes share one harvest (strategy "snapshot"): each computes the parts of the sources `own`
    names (default: all), `wait` is a barrier over them, and the one with `merge` stacks every part into the
    shards, the same merge one process does, so the store is byte for byte the single-process one. The
    merging process creates the store before the first `wait`; the others return None."""
    single = isinstance(hook, str)
    hooks = [hook] if single else list(hook)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_seq, seq_len], got {list(tokens.shape)}")
    n_seq, seq_len = tokens.shape
    sources = [str(s) for s in sources] if sources is not None else [f"source{j}" for j in range(len(models))]
    if len(sources) != len(models):
        raise ValueError(f"{len(sources)} source names for {len(models)} models")
    own = list(range(len(models))) if own is None else sorted(own)
    if strategy == "auto":
        strategy = "chunk" if all(isinstance(m, nn.Module) for m in models) else "snapshot"
    if strategy not in ("chunk", "snapshot"):
        raise ValueError(f"strategy must be 'auto', 'chunk' or 'snapshot', got {strategy!r}")
    if strategy == "chunk" and (own != list(range(len(models))) or not merge):
        raise ValueError("a harvest shared between processes (own, merge) uses strategy 'snapshot'")
    first = _load(models[own[0]]) if own else None
    d_in = int(first.cfg.d_model) if first is not None else None
    if shard_seqs is None:
        if d_in is None:
            raise ValueError("a process that computes no source needs shard_seqs")
        bytes_per_seq = seq_len * len(models) * d_in * (4 if dtype == "float32" else 2)
        shard_seqs = max(1, (64 << 20) // bytes_per_seq)
    keep = keep_mask(tokens, exclude_bos, bos_token_id, pad_token_id)
    chunks = [(c, min(c + shard_seqs, n_seq)) for c in range(0, n_seq, shard_seqs)]
    stream_id = {"sha256": tokens_sha256(tokens), "n_seq": n_seq, "seq_len": seq_len}
    meta = {**(metadata or {}), "exclude_bos": exclude_bos, "bos_token_id": bos_token_id,
            "pad_token_id": pad_token_id, "shard_seqs": shard_seqs}
    dirs = _store_dirs(hooks, Path(out_dir), single)
    writers = {}
    if merge:
        if not resume:
            for d in dirs.values():
                shutil.rmtree(d / PARTS, ignore_errors=True)
        writers = {h: StoreWriter(dirs[h], sources, h, d_in, dtype, meta, stream_id, resume=resume) for h in hooks}
    wait()  # the others read what the merging process found (or created) on disk
    # chunk index from which each hook's store still needs shards (a shard always covers a whole chunk)
    stored = {h: _stored_chunks(dirs[h], seq_len, shard_seqs) for h in hooks}
    start = {h: stored[h][0] for h in hooks}
    todo = [c for c in range(len(chunks)) if any(c >= start[h] for h in hooks) and
            not all(done for _, done in stored.values())]

    def rows(c: int) -> tuple[Tensor, Tensor, Tensor]:
        a, b = chunks[c]
        k = keep[a:b]
        pos = (torch.arange(a, b)[:, None] * seq_len + torch.arange(seq_len)).masked_select(k)
        return k, tokens[a:b].masked_select(k), pos

    def add(h: str, c: int, per_source: list[Tensor]) -> None:
        k, toks, pos = rows(c)
        if c >= start[h] and len(toks):
            writers[h].add(torch.stack(per_source, 1), toks, pos)

    def run(model: nn.Module, j: int, c: int) -> dict[str, Tensor]:
        acts = model_acts(model, tokens[slice(*chunks[c])], hooks, batch_size, method, autocast)
        for h, a in acts.items():
            if a.shape[-1] != d_in:
                raise ValueError(f"source {sources[j]!r} gives {h} of width {a.shape[-1]}, but source "
                                 f"{sources[own[0]]!r} gives {d_in}: every snapshot must have the same shape")
        return acts

    bar = progress_bar(total=len(todo) * len(own), disable=not progress, desc=f"harvest {strategy}", unit="fwd")
    if strategy == "chunk":
        for c in todo:
            k = rows(c)[0]
            per = {h: [] for h in hooks}
            for j, m in enumerate(models):
                model = first if j == 0 else _load(m)
                acts = run(model, j, c)
                for h in hooks:
                    per[h].append(acts[h][k].to(writers[h].torch_dtype))
                bar.update(1)
            for h in hooks:
                add(h, c, per[h])
    else:
        def part(h: str, j: int, c: int) -> Path:
            return dirs[h] / PARTS / f"source{j:03d}-chunk{c:05d}.safetensors"

        store_dtype = DTYPES[dtype]
        for j in own:
            need = [c for c in todo if any(c >= start[h] and not part(h, j, c).exists() for h in hooks)]
            bar.update(len(todo) - len(need))
            model = first if j == own[0] else (_load(models[j]) if need else None)
            first = None  # from here on at most one model is alive
            if not need:
                continue
            for c in need:
                k = rows(c)[0]
                acts = run(model, j, c)
                for h in hooks:
                    save_safetensors(part(h, j, c), {"acts": acts[h][k].to(store_dtype)})
                bar.update(1)
            del model
        wait()  # every process's parts are on disk
        if not merge:
            bar.close()
            return None
        for c in progress_bar(todo, disable=not progress, desc="merge", unit="shard"):
            for h in hooks:
                if c >= start[h]:
                    add(h, c, [load_file(part(h, j, c))["acts"] for j in range(len(models))])
                    for j in range(len(models)):
                        part(h, j, c).unlink(missing_ok=True)
    bar.close()
    stores = {}
    for h, w in writers.items():
        stores[h] = w.finish() if not w.complete else ActivationStore(dirs[h])
        shutil.rmtree(dirs[h] / PARTS, ignore_errors=True)
    return stores[hooks[0]] if single else stores
