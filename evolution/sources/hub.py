"""Fail fast, with a message that says why, when a recipe needs the Hugging Face hub and it is unreachable.

Real Pythia checkpoints and HF datasets come from the hub. Loading them offline would otherwise hang on
retries or fail deep inside transformers with an unrelated-looking error, after earlier stages ran.
"""

from __future__ import annotations

import os
import socket

from crosscoders.errors import UserError

HUB_HOST = "huggingface.co"


class HubUnavailable(UserError, RuntimeError):
    """The model/dataset hub cannot be reached (offline machine, HF_HUB_OFFLINE=1)."""


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def cached_locally(repo_id: str, revision: str | None = None) -> bool:
    """True when the hub cache already holds a snapshot of `repo_id` (at `revision`), so no network is needed."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, revision=revision, local_files_only=True)
        return True
    except Exception:
        return False


def require_hub(what: str, repo_ids: list[str] = (), revision: str | None = None) -> None:
    """Raise `HubUnavailable` unless the hub is reachable or every repo is already in the local cache."""
    if repo_ids and all(cached_locally(r, revision) for r in repo_ids):
        return
    if hub_reachable():
        return
    raise HubUnavailable(
        f"{what} needs the Hugging Face hub ({HUB_HOST}), which this machine cannot reach, and "
        f"{', '.join(repo_ids) or 'the data'} is not in the local cache. Run it on a machine with network "
        "access (a GPU is advised), or use the offline demo: `make demo` / `feature-evolution demo`."
    )
