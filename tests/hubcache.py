"""A local directory laid out like the Hugging Face hub cache, so the real hub-loading code runs offline."""

from __future__ import annotations

import shutil
from pathlib import Path


def hub_cache(cache: Path, repo: str, revisions: dict[str, Path]) -> None:
    """Lay `revisions` out as the Hugging Face hub cache does: refs/<rev> -> commit, snapshots/<commit>/."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    for i, (rev, src) in enumerate(revisions.items()):
        commit = f"{i:040x}"
        (base / "refs" / rev).write_text(commit)
        shutil.copytree(src, base / "snapshots" / commit)
