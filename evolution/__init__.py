"""The study of training dynamics: snapshots, pre-training, timelines, geometry and phases."""

from typing import Any

__all__ = ["load_run", "Run"]


def __getattr__(name: str) -> Any:
    # lazy, so `import evolution` stays cheap (no torch/matplotlib until the API is used)
    if name in ("load_run", "Run"):
        from evolution import api

        return getattr(api, name)
    raise AttributeError(f"module 'evolution' has no attribute {name!r}")
