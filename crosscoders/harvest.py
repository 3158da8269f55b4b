"""Run one token stream through every snapshot, at one or more hooks, into an activation store.

    harvest(models, tokens, "blocks.3.hook_resid_post", out_dir)  ->  ActivationStore

(Training straight from the models, with no store, is `crosscoders.stream.ShuffleStream`.)

`models` is a sequence of transformer-lens `HookedTransformer`s, or of zero-argument callables that
load one (e.g. `functools.partial(load_local_snapshot, path)`), so that only one model is in memory.
Each forward pass stops after the hook's layer (`stop_at_layer=L+1` for `blocks.L.*`): the layers
above it are never computed.

Memory stays bounded although the store is laid out `[tokens, n_sources, d_in]` while a harvest goes
model by model. Two independent cuts of the token stream (`Grid`): forward blocks of `batch_size`
sequences, one forward pass each, and shards of `shard_seqs` sequences (a byte budget: ~64 MiB).
  * strategy "chunk" (default when every model is already in memory): run every model on the blocks
    under the next shard and write it. Peak memory: the models plus every source's activations of the
    blocks under one shard. No temporary files.
  * strategy "snapshot" (default for lazy loaders): load each model once, run every block through it
    and write one temporary part per source and block in `<store>/.parts/`; then a merge pass stacks
    slices of the parts into each shard and deletes parts no longer read. Peak memory: one model plus
    one block; peak extra disk about one store.
Both give byte-identical stores. Processes (torchrun ranks) share a "snapshot" harvest: each writes the
parts of its own snapshots (`own`), then its `share` of the shards; the `writer` creates and finishes the
store (`wait` is the barrier between the phases). Resumable: shards and parts are written atomically and
each shard is listed in its writer's journal, so a rerun skips every finished shard and every finished part.
Positions excluded by default: position 0 of each sequence (BOS) and any `bos_token_id` /
`pad_token_id` token (pad on the right: the model is causal, so right padding does not change the
real tokens' activations).
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from torch import Tensor, nn

from .compute import release_memory
from .io import save_safetensors
from .precision import autocast_context, resolve_autocast
from .progress import progress_bar
from .store import DTYPES, MANIFEST, ActivationStore, StoreError, read_manifest
from .store_writer import StoreWriter, tokens_sha256, written_shards

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


@dataclass(frozen=True)
class Grid:
    """Where each sequence goes. Shard s stores sequences [s·shard_seqs, (s+1)·shard_seqs); forward block b
    computes [b·block_seqs, (b+1)·block_seqs) in one forward pass. The two are independent: at Pythia's shape
    a 64 MiB shard holds one sequence (1024 · 32 snapshots · 768 · 2 B = 50 MB), and one-sequence forwards
    would leave the GPU idle. `rows[i]` = stored (kept) rows before sequence i, so the rows of any range
    of sequences are one contiguous range of a block's rows."""

    n_seq: int
    shard_seqs: int
    block_seqs: int
    rows: Tensor

    @property
    def n_shards(self) -> int:
        return -(-self.n_seq // self.shard_seqs)

    @property
    def n_blocks(self) -> int:
        return -(-self.n_seq // self.block_seqs)

    def shard(self, s: int) -> tuple[int, int]:
        return s * self.shard_seqs, min((s + 1) * self.shard_seqs, self.n_seq)

    def block(self, b: int) -> tuple[int, int]:
        return b * self.block_seqs, min((b + 1) * self.block_seqs, self.n_seq)

    def n_rows(self, s: int) -> int:
        a, c = self.shard(s)
        return int(self.rows[c] - self.rows[a])

    def blocks_of(self, s: int) -> range:
        a, c = self.shard(s)
        return range(a // self.block_seqs, (c - 1) // self.block_seqs + 1)

    def rows_in(self, s: int, b: int) -> tuple[int, int]:
        """Shard s's rows inside block b's rows (offsets from the block's first row)."""
        (a, c), (b0, b1) = self.shard(s), self.block(b)
        return int(self.rows[max(a, b0)] - self.rows[b0]), int(self.rows[min(c, b1)] - self.rows[b0])


def _missing(d: Path, grid: Grid, seq_len: int) -> list[int]:
    """Shards of the store at `d` still to write: those with stored rows that no manifest or journal lists."""
    shards, complete = written_shards(d)
    if complete:
        return []
    done = {(s["last_position"] // seq_len) // grid.shard_seqs for s in shards}
    return [s for s in range(grid.n_shards) if s not in done and grid.n_rows(s)]


def forward_record(autocast: str, precision: str, device: torch.device, dtype: str) -> dict:
    """What the store manifest's metadata says about how its activations were computed: the analysis compares
    them with its own fp32 probes, and bf16 autocast ("auto" where measured faster) changes the low bits."""
    return {"autocast": autocast, "precision": "bf16" if precision == "bf16" else "fp32",
            "device": torch.device(device).type, "store_dtype": dtype}


def harvest(models: Sequence[ModelLike], tokens: Int[Tensor, "n_seq seq_len"], hook: str | Sequence[str],
            out_dir: str | Path, sources: Sequence[str] | None = None, batch_size: int = 32,
            exclude_bos: bool = True, resume: bool = True, *, dtype: str = "bfloat16",
            shard_seqs: int | None = None, shard_bytes: int = 64 << 20, bos_token_id: int | None = None,
            pad_token_id: int | None = None, strategy: str = "auto", method: str = "cache",
            metadata: dict | None = None, progress: bool = True, autocast: str = "auto",
            own: Sequence[int] | None = None, writer: bool = True, share: tuple[int, int] = (0, 1),
            wait: Callable[[], None] = lambda: None) -> ActivationStore | dict[str, ActivationStore] | None:
    """Harvest `hook` of every model on `tokens` into a store at `out_dir` (one hook), or into
    `out_dir/<hook>/` for each of several hooks (one forward pass per model and block serves them all).

    `batch_size`: sequences per forward pass, whatever the shard size. `shard_seqs`: sequences per shard
    (default: as many as fit `shard_bytes`, at least one). `sources`: names in the manifest (default source0,
    source1, ...). `autocast`: precision of the forward passes ("auto": bf16 only where measured faster,
    crosscoders/precision.py); the one used is recorded in the manifest's `metadata["forward"]`.

    Several processes share one harvest (strategy "snapshot"): each computes the parts of the sources `own`
    names (default: all) and, after `wait` (a barrier over them), writes its `share` = (index, count) of the
    shards; the `writer` creates the store before the first `wait` (its forward precision is everyone's) and
    finishes it after the last, so the store is byte for byte the single-process one. The others return None."""
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
    if strategy == "chunk" and (own != list(range(len(models))) or not writer or share != (0, 1)):
        raise ValueError("a harvest shared between processes (own, writer, share) uses strategy 'snapshot'")
    first = _load(models[own[0]]) if own else None
    if writer and first is None:
        raise ValueError("the writer process computes at least one source (its model fixes d_in and precision)")
    d_in = int(first.cfg.d_model) if first is not None else None
    if shard_seqs is None:
        if d_in is None:
            raise ValueError("a process that computes no source needs shard_seqs")
        shard_seqs = max(1, shard_bytes // (seq_len * len(models) * d_in * DTYPES[dtype].itemsize))
    keep = keep_mask(tokens, exclude_bos, bos_token_id, pad_token_id)
    grid = Grid(n_seq, shard_seqs, batch_size, torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)]))
    dirs = _store_dirs(hooks, Path(out_dir), single)
    writers: dict[str, StoreWriter] = {}
    if writer:
        precision = resolve_autocast(autocast, _device(first))
        meta = {**(metadata or {}), "exclude_bos": exclude_bos, "bos_token_id": bos_token_id,
                "pad_token_id": pad_token_id, "shard_seqs": shard_seqs,
                "forward": forward_record(autocast, precision, _device(first), dtype)}
        stream_id = {"sha256": tokens_sha256(tokens), "n_seq": n_seq, "seq_len": seq_len}
        if not resume:
            for d in dirs.values():
                shutil.rmtree(d / PARTS, ignore_errors=True)
        writers = {h: StoreWriter(dirs[h], sources, h, d_in, dtype, meta, stream_id, resume=resume) for h in hooks}
    wait()  # the others read what the writer found (or created) on disk
    if not writer:  # compute in the writer's precision: one store, one precision, as its manifest says
        m = read_manifest(dirs[hooks[0]] / MANIFEST)
        precision = "bf16" if m["metadata"]["forward"]["precision"] == "bf16" else "none"
        writers = {h: StoreWriter.attach(dirs[h], f"share{share[0]}") for h in hooks}
    missing = {h: _missing(dirs[h], grid, seq_len) for h in hooks}
    blocks = {h: {b for s in missing[h] for b in grid.blocks_of(s)} for h in hooks}  # the blocks each hook reads
    todo = sorted(set().union(*blocks.values()))

    def block_acts(model: nn.Module, j: int, b: int) -> dict[str, Tensor]:
        """Source j's stored rows of block b at every hook, in the store dtype."""
        a, c = grid.block(b)
        with autocast_context(precision, _device(model)):  # already resolved: model_acts would probe again
            acts = model_acts(model, tokens[a:c], hooks, batch_size, method, "none")
        for h, x in acts.items():
            if x.shape[-1] != d_in and d_in is not None:
                raise ValueError(f"source {sources[j]!r} gives {h} of width {x.shape[-1]}, but source "
                                 f"{sources[own[0]]!r} gives {d_in}: every snapshot must have the same shape")
        return {h: x[keep[a:c]].to(DTYPES[dtype]) for h, x in acts.items()}

    def write(h: str, s: int, block_rows: Callable[[int, int], Tensor]) -> None:
        """Shard s of hook h from `block_rows(j, b)`: source j's rows of block b (any indexable)."""
        a, c = grid.shard(s)
        per = [torch.cat([block_rows(j, b)[slice(*grid.rows_in(s, b))] for b in grid.blocks_of(s)])
               for j in range(len(models))]
        k = keep[a:c]
        pos = (torch.arange(a, c)[:, None] * seq_len + torch.arange(seq_len)).masked_select(k)
        writers[h].add(torch.stack(per, 1), tokens[a:c].masked_select(k), pos, index=s)

    bar = progress_bar(total=len(todo) * len(own), disable=not progress, desc=f"harvest {strategy}", unit="fwd")
    if strategy == "chunk":
        cache: dict[int, list[dict[str, Tensor]]] = {}  # block -> per source; at most the blocks of one shard
        wanted = {h: set(missing[h]) for h in hooks}
        for s in sorted(set().union(*map(set, missing.values()))):
            for b in list(cache):
                if b < grid.blocks_of(s)[0]:
                    del cache[b]
            for b in grid.blocks_of(s):
                if b not in cache:
                    cache[b] = [block_acts(first if j == 0 else _load(m), j, b) for j, m in enumerate(models)]
                    bar.update(len(models))
            for h in hooks:
                if s in wanted[h]:
                    write(h, s, lambda j, b, h=h: cache[b][j][h])
        bar.close()
    else:
        def part(h: str, j: int, b: int) -> Path:
            a, c = grid.block(b)  # the name says which sequences: a resume with another batch_size reuses nothing
            return dirs[h] / PARTS / f"source{j:03d}-seq{a:08d}-{c:08d}.safetensors"

        for j in own:
            need = [b for b in todo if any(b in blocks[h] and not part(h, j, b).exists() for h in hooks)]
            bar.update(len(todo) - len(need))
            model = first if j == own[0] else (_load(models[j]) if need else None)
            first = None  # from here on at most one model is alive
            for b in need:
                for h, x in block_acts(model, j, b).items():
                    if b in blocks[h]:
                        save_safetensors(part(h, j, b), {"acts": x})
                bar.update(1)
            dev = _device(model) if model is not None else "cpu"
            del model
            release_memory(dev)
        bar.close()
        wait()  # every process's parts are on disk
        _merge(grid, hooks, missing, share, part, write, len(models), progress)
        wait()  # every process's shards are on disk and in its journal
    if not writer:
        return None
    stores = {}
    for h, w in writers.items():
        if left := _missing(dirs[h], grid, seq_len):
            raise StoreError(f"{dirs[h]}: shards {left[:5]}... were not written; rerun the harvest to resume it")
        stores[h] = w.finish() if not w.complete else ActivationStore(dirs[h])
        shutil.rmtree(dirs[h] / PARTS, ignore_errors=True)
    return stores[hooks[0]] if single else stores


def _merge(grid: Grid, hooks: Sequence[str], missing: dict[str, list[int]], share: tuple[int, int],
           part: Callable[[str, int, int], Path], write: Callable, n_sources: int, progress: bool) -> None:
    """This process's share of the merge: a contiguous run of each hook's missing shards, each stacked from
    every source's parts (read as slices, so memory is one shard). Merging on one process while the others
    wait in a barrier took the whole store's I/O (~150 GB for Pythia-160M x 32 snapshots) on one rank.
    A block's parts are deleted once every shard that reads them is written, when those are all this share's
    (parts at the edge of two shares go with the .parts folder at the end): extra disk stays about one store."""
    i, n = share
    mine = {h: missing[h][len(missing[h]) * i // n: len(missing[h]) * (i + 1) // n] for h in hooks}
    for h in hooks:
        if not mine[h]:
            continue
        lo, hi = mine[h][0], mine[h][-1]
        readers: dict[int, list[int]] = {}  # block -> the missing shards that read it
        for s in missing[h]:
            for b in grid.blocks_of(s):
                readers.setdefault(b, []).append(s)
        opened: dict[tuple[int, int], tuple] = {}  # (source, block) -> (open part, its acts as a lazy slice)

        def rows(j: int, b: int, h: str = h, opened: dict = opened):
            if (j, b) not in opened:
                f = safe_open(part(h, j, b), framework="pt")
                opened[j, b] = f, f.get_slice("acts")
                a, c = grid.block(b)
                if (got := opened[j, b][1].get_shape()[0]) != (want := int(grid.rows[c] - grid.rows[a])):
                    raise StoreError(f"{part(h, j, b)}: {got} rows where this harvest stores {want}: a part of "
                                     "another harvest; delete it")
            return opened[j, b][1]

        for s in progress_bar(mine[h], disable=not progress, desc=f"merge {i + 1}/{n}", unit="shard"):
            write(h, s, rows)
            for b in grid.blocks_of(s):
                if readers[b][-1] == s and lo <= readers[b][0] and readers[b][-1] <= hi:
                    for j in range(n_sources):
                        opened.pop((j, b), None)
                        part(h, j, b).unlink(missing_ok=True)
