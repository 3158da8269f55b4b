"""On-disk activation store: shards of `acts[n_tokens, n_sources, d_in]`, a manifest, a shuffled reader.

Layout of a store directory (DESIGN.md, "Data flow"):

    shard-00000.safetensors   acts [n, n_sources, d_in] (bf16/fp16/fp32), tokens [n] int64,
                              positions [n] int64 (flat index seq * seq_len + pos into the token stream)
    manifest.json             written atomically when the store is created and when it is finished
    shards*.jsonl             while it is written: one line per shard, appended by each writer process

`manifest.json` holds the format version, sources (e.g. "step512"), hook, d_in, dtype, the token
stream's identity (sha256 of the token ids), free metadata, one entry per shard (file, n_tokens, bytes,
sha256, per-source mean norm) and, once the writer has finished, the per-source normalisation scales
`scale_s = sqrt(d_in) / E|x_s|` (so every source has mean norm sqrt(d_in) during training;
Anthropic's crosscoder note, Lindsey et al. 2024). Writing it (journals, resume, several writer
processes) is `crosscoders.store_writer`.

The reader shuffles across shards in bounded memory: per epoch a seeded permutation of the shard
order, and a shuffle buffer of `shuffle_buffer_tokens` rows that is refilled shard by shard and
re-permuted, so each batch mixes several shards. The shuffle runs on token indices first, so
`start_batch=n` skips n batches without reading their data (resumable training).
Every problem is a `StoreError` naming the file: checksum or size mismatch, truncated safetensors,
manifest/shard disagreement, missing shard, mismatch with the crosscoder, NaN/inf activations.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors.torch import load as st_load
from torch import Tensor

from .errors import UserError

FORMAT = "feature-evolution/activation-store"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class StoreError(UserError, ValueError):
    """The activation store is unusable; the message names the file and what is wrong."""


ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
_NP_STORAGE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
"""numpy types that hold the stored bytes (numpy has no bf16: its bits, viewed back as torch.bfloat16)."""


def check_finite(acts: Tensor, where: str) -> None:
    bad = ~torch.isfinite(acts)
    if bad.any():
        tok, src = (int(i) for i in bad.nonzero()[0][:2])
        raise StoreError(f"{where}: {int(bad.sum())} non-finite activation value(s) (NaN/inf), first at row "
                         f"{tok} source {src}; the model produced them, or they overflowed the store dtype")


def read_manifest(path: Path) -> dict:
    if not path.exists():
        raise StoreError(f"{path}: no manifest; not an activation store (or the harvest never wrote a shard)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: unreadable manifest ({e})") from None
    missing = [k for k in ("format", "version", "sources", "hook", "d_in", "dtype", "shards") if k not in m]
    if missing or m.get("format") != FORMAT:
        raise StoreError(f"{path}: not an activation-store manifest (missing {missing or 'format'})")
    if m["version"] != VERSION:
        raise StoreError(f"{path}: store format version {m['version']}, this code reads version {VERSION}")
    return m


class ActivationStore:
    """Reader of a finished store. `ActivationStore(dir)` checks the manifest and that every shard
    exists with its listed size; `verify()` also checks checksums, shapes, dtypes and values."""

    def __init__(self, dir: str | Path, require_complete: bool = True):
        self.dir = Path(dir)
        self.manifest_path = self.dir / MANIFEST
        self.manifest: dict[str, Any] = read_manifest(self.manifest_path)
        m = self.manifest
        if require_complete and not m.get("complete"):
            raise StoreError(f"{self.manifest_path}: store is unfinished (an interrupted harvest?); "
                             "rerun the harvest to resume it")
        if not m["shards"]:
            raise StoreError(f"{self.manifest_path}: store lists no shards")
        if m.get("n_tokens") is not None and m["n_tokens"] != sum(s["n_tokens"] for s in m["shards"]):
            raise StoreError(f"{self.manifest_path}: n_tokens {m['n_tokens']} is not the sum of its shards' "
                             f"{sum(s['n_tokens'] for s in m['shards'])}")
        for s in m["shards"]:
            f = self.dir / s["file"]
            if not f.exists():
                raise StoreError(f"{f}: shard listed in {self.manifest_path} is missing")
            if f.stat().st_size != s["bytes"]:
                raise StoreError(f"{f}: {f.stat().st_size} bytes but {self.manifest_path} says {s['bytes']} "
                                 "(truncated or rewritten shard)")
        self.sources: list[str] = m["sources"]
        self.d_in: int = int(m["d_in"])
        self.shard_sizes = [int(s["n_tokens"]) for s in m["shards"]]
        self.n_tokens = sum(self.shard_sizes)
        self._offsets = torch.tensor([0, *self.shard_sizes]).cumsum(0)
        self._maps: dict[int, np.ndarray] = {}

    @property
    def scales(self) -> Float[Tensor, " n_sources"]:
        """Per-source normalisation scale: multiply raw activations by it for mean norm sqrt(d_in)."""
        if self.manifest.get("scales") is None:
            raise StoreError(f"{self.manifest_path}: no normalisation scales (store unfinished)")
        return torch.tensor(self.manifest["scales"], dtype=torch.float32)

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.dir)!r}, hook={self.manifest['hook']!r}, sources={self.n_sources}, "
                f"d_in={self.d_in}, tokens={self.n_tokens}, shards={len(self.shard_sizes)})")

    def check_matches(self, n_sources: int, d_in: int) -> None:
        """StoreError unless this store feeds a crosscoder over `n_sources` sources of width `d_in`."""
        if (n_sources, d_in) != (self.n_sources, self.d_in):
            raise StoreError(f"{self.manifest_path}: store holds {self.n_sources} sources {self.sources} of "
                             f"d_in={self.d_in} (hook {self.manifest['hook']}), but the crosscoder expects "
                             f"n_sources={n_sources}, d_in={d_in}")

    def load_shard(self, i: int, check_sha: bool = True) -> dict[str, Tensor]:
        """Shard `i` as {"acts", "tokens", "positions"}, checked against the manifest (and its sha256)."""
        entry = self.manifest["shards"][i]
        f = self.dir / entry["file"]
        try:
            data = f.read_bytes()
        except OSError as e:
            raise StoreError(f"{f}: cannot read shard ({e})") from None
        if len(data) != entry["bytes"]:
            raise StoreError(f"{f}: {len(data)} bytes but the manifest says {entry['bytes']} (truncated?)")
        if check_sha and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreError(f"{f}: sha256 does not match {self.manifest_path} (corrupted or altered shard)")
        try:
            t = st_load(data)
        except Exception as e:  # safetensors raises its own error types for a malformed header/body
            raise StoreError(f"{f}: not a readable safetensors file ({e})") from None
        if set(t) != {"acts", "tokens", "positions"}:
            raise StoreError(f"{f}: expected tensors acts, tokens, positions; found {sorted(t)}")
        n, shape = entry["n_tokens"], (entry["n_tokens"], self.n_sources, self.d_in)
        if tuple(t["acts"].shape) != shape or t["tokens"].shape != (n,) or t["positions"].shape != (n,):
            raise StoreError(f"{f}: acts {list(t['acts'].shape)} / tokens {list(t['tokens'].shape)} disagree "
                             f"with {self.manifest_path} ({list(shape)})")
        if t["acts"].dtype != DTYPES[self.manifest["dtype"]]:
            raise StoreError(f"{f}: acts are {t['acts'].dtype}, manifest says {self.manifest['dtype']}")
        check_finite(t["acts"], str(f))
        return t

    def verify(self) -> dict:
        """Read every shard: sizes, sha256, shapes, dtype, finite values. Returns a summary; raises StoreError."""
        for i in range(len(self.shard_sizes)):
            self.load_shard(i)
        return {"shards": len(self.shard_sizes), "n_tokens": self.n_tokens, "ok": True}

    def tokens(self) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
        """All stored (tokens, positions) in store order (small: two int64 per token)."""
        parts = [self.load_shard(i) for i in range(len(self.shard_sizes))]
        return torch.cat([p["tokens"] for p in parts]), torch.cat([p["positions"] for p in parts])

    def _index_stream(self, batch_size: int, seed: int, buffer: int, n_epochs: int | None,
                      drop_last: bool) -> Iterator[tuple[str, Any]]:
        """The shuffle on token indices: yields ("shard", i) when shard i enters the buffer,
        ("perm", p) when the buffer is permuted, ("batch", n) when n rows leave its front."""
        epoch, size = 0, 0
        while n_epochs is None or epoch < n_epochs:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.shard_sizes), generator=g).tolist()
            for k, i in enumerate(order):
                yield "shard", i
                size += self.shard_sizes[i]
                last = k == len(order) - 1
                if size < buffer and not last:
                    continue
                yield "perm", torch.randperm(size, generator=g)
                while size >= batch_size and size > buffer // 2:
                    yield "batch", batch_size
                    size -= batch_size
            epoch += 1
        while size >= batch_size:
            yield "batch", batch_size
            size -= batch_size
        if size and not drop_last:
            yield "batch", size

    def batches(self, batch_size: int, seed: int = 0, normalize: bool = True,
                shuffle_buffer_tokens: int | None = None, n_epochs: int | None = None,
                start_batch: int = 0, drop_last: bool = False, device: str | torch.device = "cpu",
                shuffle_buffer: int | None = None, rows: tuple[int, int] = (0, 1),
                sources: slice = slice(None)) -> Iterator[Float[Tensor, "batch n_sources d_in"]]:
        """Float32 batches `[batch, n_sources, d_in]`, shuffled across shards, deterministic given `seed`.

        `n_epochs=None` streams forever (epochs follow each other without a partial batch between them).
        `shuffle_buffer_tokens` (alias `shuffle_buffer`) bounds the shuffle: it mixes that many rows plus at
        most one shard (default: four average shards). `start_batch=n` yields from batch n on, exactly as if
        the first n had been consumed. `normalize` multiplies by the manifest's scales.

        `rows=(d, D)`, `sources`: only block d of D equal row blocks, and those sources, of every batch (a
        data-parallel rank's share, crosscoders/distributed.py): only those rows are read from disk. The
        shuffle runs on token indices, so the batches are the same whoever reads them; each row is read
        where it lies in its shard (memory-mapped), and each shard's sha256 is checked once per reader by
        one rank, shards d, d + D, ... by rank d (every shard by some rank; rows are checked finite as read)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        d, D = rows
        buf_tokens = shuffle_buffer_tokens if shuffle_buffer_tokens is not None else shuffle_buffer
        if buf_tokens is None:
            buf_tokens = 4 * math.ceil(self.n_tokens / len(self.shard_sizes))
        buf_tokens = max(int(buf_tokens), batch_size)
        scale = self.scales[sources].to(device)[None, :, None] if normalize else None
        idx = torch.empty(0, dtype=torch.long)  # global token indices in the buffer
        n_batch, checked = 0, set()
        for kind, val in self._index_stream(batch_size, seed, buf_tokens, n_epochs, drop_last):
            if kind == "shard":
                lo, hi = int(self._offsets[val]), int(self._offsets[val + 1])
                idx = torch.cat([idx, torch.arange(lo, hi)])
            elif kind == "perm":
                idx = idx[val]
            else:
                if n_batch >= start_batch:
                    if val % D:
                        raise StoreError(f"a global batch of {val} rows does not split over {D} data ranks: "
                                         "choose a batch_size divisible by the data-parallel size")
                    mine = idx[:val][d * (val // D):(d + 1) * (val // D)]
                    self._check_shards(mine, d, D, checked)
                    x = self._read_rows(mine, sources).to(device=device, dtype=torch.float32)
                    yield x * scale if scale is not None else x
                idx = idx[val:]
                n_batch += 1

    def _shard_of(self, idx: Tensor) -> Tensor:
        return torch.searchsorted(self._offsets, idx, right=True) - 1

    def _check_shards(self, idx: Tensor, d: int, D: int, checked: set) -> None:
        """sha256 (and shape, dtype, values) of the shards of `idx` that fall to this rank, once each."""
        for i in self._shard_of(idx).unique().tolist():
            if i % D == d and i not in checked:
                self.load_shard(i)
                checked.add(i)

    def _rows_map(self, i: int) -> np.ndarray:
        """Shard i's acts as a read-only memory map [n, n_sources, d_in] (raw storage: bf16 as uint16)."""
        if i not in self._maps:
            f = self.dir / self.manifest["shards"][i]["file"]
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(n))
            except (OSError, ValueError) as e:
                raise StoreError(f"{f}: not a readable safetensors file ({e})") from None
            acts, shape = header.get("acts", {}), [self.shard_sizes[i], self.n_sources, self.d_in]
            if acts.get("shape") != shape or acts.get("dtype") != ST_DTYPES[DTYPES[self.manifest["dtype"]]]:
                raise StoreError(f"{f}: acts {acts.get('shape')} {acts.get('dtype')} disagree with "
                                 f"{self.manifest_path} ({shape}, {self.manifest['dtype']})")
            self._maps[i] = np.memmap(f, dtype=_NP_STORAGE[self.manifest["dtype"]], mode="r",
                                      offset=8 + n + acts["data_offsets"][0], shape=tuple(shape))
        return self._maps[i]

    def _read_rows(self, idx: Tensor, sources: slice = slice(None)) -> Tensor:
        """Activations (stored dtype) of global token indices `idx`, in that order, sources `sources`: only
        these rows are read, each shard's in file order."""
        dtype = DTYPES[self.manifest["dtype"]]
        n_src = len(range(self.n_sources)[sources])
        out = torch.empty((len(idx), n_src, self.d_in), dtype=dtype)
        shard = self._shard_of(idx)
        for i in shard.unique().tolist():
            pos = (shard == i).nonzero().squeeze(1)
            local = idx[pos] - self._offsets[i]
            order = local.argsort()
            block = self._rows_map(i)[local[order].numpy(), sources]
            out[pos[order]] = torch.from_numpy(np.ascontiguousarray(block)).view(dtype)
        check_finite(out, f"{self.dir} (rows of shards {shard.unique().tolist()})")
        return out
