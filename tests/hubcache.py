"""A local directory laid out like the Hugging Face hub cache, so the real hub-loading code runs offline."""

from __future__ import annotations

from pathlib import Path

from evolution.sources.standin import write_hub_cache


def hub_cache(cache: Path, repo: str, revisions: dict[str, Path]) -> None:
    """Lay `revisions` out as the Hugging Face hub cache does: refs/<rev> -> commit, snapshots/<commit>/."""
    write_hub_cache(cache, repo, revisions)
