"""Writing an activation store (format and reader: `crosscoders.store`), shard by shard, resumably.

Each `StoreWriter.add` writes one shard atomically, then appends its line to the writer's journal
(`shards*.jsonl`). A shard absent from the manifest and the journals (on disk at its listed size) does not
exist: an interrupted writer resumes with the shards they list. The manifest is not rewritten per shard
(with thousands of shards that is quadratic in writes); `finish` folds the journals into it, with the
normalisation scales, and deletes them. Shards are serialised with a deterministic layout, so a resumed
harvest is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .io import read_jsonl, write_bytes, write_json
from .store import (
    DTYPES,
    FORMAT,
    MANIFEST,
    ST_DTYPES,
    VERSION,
    ActivationStore,
    StoreError,
    check_finite,
    read_manifest,
)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _journal(dir: Path, name: str | None) -> Path:
    """A writer's journal, its last line completed: a line torn by a crash would swallow the next one."""
    path = dir / (f"shards.{name}.jsonl" if name else "shards.jsonl")
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
    return path


def written_shards(dir: str | Path) -> tuple[list[dict], bool]:
    """(shards written so far in stream order, complete) of the store being written at `dir`: the manifest's
    shards plus those its writers' journals list whose file is on disk at its listed size (a line whose
    shard did not survive a crash is dropped: the harvest writes that shard again). ([], False) if no store."""
    dir = Path(dir)
    if not (dir / MANIFEST).exists():
        return [], False
    m = read_manifest(dir / MANIFEST)
    shards = {s["file"]: s for s in m["shards"]}
    for j in sorted(dir.glob("shards*.jsonl")):
        for s in read_jsonl(j):
            f = dir / s["file"]
            if f.exists() and f.stat().st_size == s["bytes"]:
                shards[s["file"]] = s
    return sorted(shards.values(), key=lambda s: s["last_position"]), bool(m.get("complete"))


def tokens_sha256(tokens: Tensor) -> str:
    """Identity of a token stream: sha256 of its ids as little-endian int64, plus its shape."""
    t = torch.as_tensor(tokens).to(torch.int64).contiguous().cpu()
    h = hashlib.sha256(str(list(t.shape)).encode())
    h.update(t.numpy().astype("<i8").tobytes())
    return h.hexdigest()


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        name, name)
    if name not in DTYPES:
        raise ValueError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def serialize(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes with a deterministic layout (tensors in name order), so that the same data
    always gives the same file and sha256: a resumed harvest is byte-identical to an uninterrupted one
    (`safetensors.torch.save` orders tensors of different dtypes unpredictably)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # 8-byte alignment of the data section
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


class StoreWriter:
    """Writes a store shard by shard; each `add` call is one shard (callers choose the chunking).

    `resume=True` reopens an unfinished store with the same header and continues with the shards it lists
    (`n_shards`, `n_tokens`, `last_position` say where); a header mismatch is an error, never a silent
    mix. `resume=False` deletes an existing store in `dir` first. Several processes can write one store:
    this writer creates and finishes it, each other one `attach`es and writes shards at the indices it is
    given, listing them in its own journal."""

    def __init__(self, dir: str | Path, sources: Sequence[str], hook: str, d_in: int,
                 dtype: str | torch.dtype = "bfloat16", metadata: dict | None = None,
                 token_stream: dict | None = None, resume: bool = True):
        self.dir = Path(dir)
        self.header = {"format": FORMAT, "version": VERSION, "sources": [str(s) for s in sources],
                       "hook": hook, "d_in": int(d_in), "dtype": _dtype_name(dtype),
                       "token_stream": token_stream, "metadata": metadata or {}}
        self.torch_dtype = DTYPES[self.header["dtype"]]
        self.shards: list[dict] = []
        self.complete = False
        self.journal = _journal(self.dir, None)
        path = self.dir / MANIFEST
        if path.exists() and resume:
            old = read_manifest(path)
            header = json.loads(json.dumps(self.header))  # tuples -> lists, as they are on disk
            diff = [k for k in header if old.get(k) != header[k]]
            if diff:
                raise StoreError(f"{path}: existing store was written with different {diff} "
                                 f"({[old.get(k) for k in diff]} vs {[header[k] for k in diff]}); "
                                 "use another directory or resume=False to overwrite it")
            for s in old["shards"]:
                f = self.dir / s["file"]
                if not f.exists() or f.stat().st_size != s["bytes"]:
                    raise StoreError(f"{f}: listed in {path} but missing or of the wrong size; "
                                     "delete the store and harvest again")
            self.shards, self.complete = written_shards(self.dir)
        elif path.exists() or any(self.dir.glob("shard-*.safetensors")) or any(self.dir.glob("shards*.jsonl")):
            path.unlink(missing_ok=True)
            for f in [*self.dir.glob("shard-*.safetensors"), *self.dir.glob("shards*.jsonl")]:
                f.unlink()
        if not path.exists():
            self._write_manifest()  # the header is fixed from the start: a rerun with other settings is refused

    @classmethod
    def attach(cls, dir: str | Path, name: str) -> StoreWriter:
        """Another process's writer of the store that a `StoreWriter` created at `dir` (a torchrun rank merging
        its share of the shards): `add(..., index=i)` writes shard i and lists it in `shards.<name>.jsonl`;
        it never writes the manifest (the creating writer's `finish` collects the journals)."""
        self = cls.__new__(cls)
        self.dir = Path(dir)
        m = read_manifest(self.dir / MANIFEST)
        self.header = {k: m[k] for k in ("format", "version", "sources", "hook", "d_in", "dtype", "token_stream",
                                         "metadata")}
        self.torch_dtype = DTYPES[self.header["dtype"]]
        self.shards, self.complete = [], bool(m.get("complete"))
        self.journal = _journal(self.dir, name)
        return self

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.shards)

    @property
    def last_position(self) -> int:
        """Largest token-stream position stored so far (-1 when empty)."""
        return max((s["last_position"] for s in self.shards), default=-1)

    def add(self, acts: Float[Tensor, "n n_sources d_in"], tokens: Int[Tensor, " n"],
            positions: Int[Tensor, " n"] | None = None, index: int | None = None) -> Path:
        """Write one shard atomically (as shard `index`, default the next), then its line in this writer's
        journal. Non-finite values are an error."""
        if self.complete:
            raise StoreError(f"{self.dir / MANIFEST}: store is finished; cannot add shards")
        S, D = len(self.header["sources"]), self.header["d_in"]
        if acts.ndim != 3 or tuple(acts.shape[1:]) != (S, D):
            raise StoreError(f"{self.dir}: acts must be [n, n_sources={S}, d_in={D}], got {list(acts.shape)}")
        n = acts.shape[0]
        if n == 0:
            raise StoreError(f"{self.dir}: refusing to write an empty shard")
        tokens = torch.as_tensor(tokens).reshape(-1).to(torch.int64).cpu()
        positions = (torch.arange(self.n_tokens, self.n_tokens + n) if positions is None
                     else torch.as_tensor(positions).reshape(-1).to(torch.int64).cpu())
        if tokens.shape[0] != n or positions.shape[0] != n:
            raise StoreError(f"{self.dir}: {n} activation rows but {tokens.shape[0]} tokens / "
                             f"{positions.shape[0]} positions")
        stored = acts.detach().to("cpu", self.torch_dtype).contiguous()
        name = shard_name(self.n_shards if index is None else index)
        check_finite(stored, f"{self.dir / name} (while writing)")
        data = serialize({"acts": stored, "tokens": tokens, "positions": positions},
                         metadata={"format": FORMAT, "hook": self.header["hook"]})
        write_bytes(self.dir / name, data)  # fsynced before its journal line: a listed shard is on disk
        entry = {"file": name, "n_tokens": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                 "last_position": int(positions.max()), "mean_norm": stored.float().norm(dim=-1).mean(0).tolist()}
        # no fsync: a line lost in a crash only means that shard is written again on resume
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self.shards.append(entry)
        return self.dir / name

    def mean_norms(self) -> Tensor:
        """Per-source mean activation norm over every token written (exact, from the shard statistics)."""
        if not self.shards:
            raise StoreError(f"{self.dir}: no shards written")
        n = torch.tensor([s["n_tokens"] for s in self.shards], dtype=torch.float64)
        m = torch.tensor([s["mean_norm"] for s in self.shards], dtype=torch.float64)
        return (n[:, None] * m).sum(0) / n.sum()

    def finish(self, scales: Sequence[float] | Tensor | None = None) -> ActivationStore:
        """Mark the store complete with its normalisation scales (default: sqrt(d_in) / mean norm over
        all written tokens) and return a reader."""
        if self.journal != _journal(self.dir, None):
            raise StoreError(f"{self.dir}: an attached writer does not finish the store; the one that created it does")
        self.shards, _ = written_shards(self.dir)  # every writer's shards, in stream order
        if scales is None:
            scales = math.sqrt(self.header["d_in"]) / self.mean_norms().clamp(min=1e-12)
        scales = [float(s) for s in torch.as_tensor(scales).reshape(-1)]
        if len(scales) != len(self.header["sources"]) or not all(math.isfinite(s) and s > 0 for s in scales):
            raise StoreError(f"{self.dir}: need {len(self.header['sources'])} positive finite scales, got {scales}")
        self.complete = True
        self._write_manifest(scales)
        for j in self.dir.glob("shards*.jsonl"):  # folded into the manifest
            j.unlink()
        return ActivationStore(self.dir)

    def _write_manifest(self, scales: list[float] | None = None) -> None:
        write_json(self.dir / MANIFEST, {**self.header, "complete": self.complete, "n_tokens": self.n_tokens,
                                         "scales": scales, "shards": self.shards})
