"""Documents from local text files: `.txt` (one document per file), `.jsonl` and `.jsonl.zst` (one JSON
object per line, the text in one column; the Pile's shards are `.jsonl.zst`), read lazily in order."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".jsonl.zst")


def is_text_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SUFFIXES)


def text_files(path: Path) -> list[Path]:
    """`path` itself, or every .txt / .jsonl / .jsonl.zst file under a directory, sorted."""
    if path.is_file():
        if not is_text_file(path):
            raise ValueError(f"corpus file {path} is not one of {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(f for f in path.rglob("*") if is_text_file(f))
    if not files:
        raise ValueError(f"corpus source {path} is a directory with no {', '.join(SUFFIXES)} files")
    return files


def _jsonl_lines(path: Path) -> Iterator[str]:
    if path.name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            yield from io.TextIOWrapper(reader, encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            yield from f


def iter_documents(path: Path, text_column: str = "text") -> Iterator[str]:
    """Each document of each file under `path` (see the module docstring)."""
    for f in text_files(path):
        if f.suffix == ".txt":
            yield f.read_text(encoding="utf-8")
            continue
        for n, line in enumerate(_jsonl_lines(f), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}, line {n}: not JSON ({e})") from e
            if not isinstance(row, dict) or text_column not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{f}, line {n}: no column {text_column!r} (has {keys})")
            yield row[text_column]


def first_chars(texts: list[str], max_chars: int) -> list[str]:
    """The leading documents up to the one reaching `max_chars` characters (0: all)."""
    total = 0
    for i, t in enumerate(texts):
        total += len(t)
        if max_chars and total >= max_chars:
            return texts[: i + 1]
    return texts
