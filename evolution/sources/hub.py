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


def cached_locally(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> bool:
    """True when the hub cache already holds a snapshot of `repo_id` (at `revision`), so no network is needed."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache_dir)
        return True
    except Exception:
        return False


class MissingRevisions(UserError, ValueError):
    """The hub repo has no revision for some of the steps a run needs."""


def revision_cached(repo_id: str, revision: str, cache_dir: str | None = None) -> bool:
    """True when the cache holds `repo_id`'s config.json at `revision` (a checkpoint revision such as step1000)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision), str)


def hub_revisions(repo_id: str) -> set[str]:
    """The branch names of `repo_id` on the hub (Pythia's checkpoints are branches step0 .. step143000)."""
    from huggingface_hub import HfApi

    refs = HfApi().list_repo_refs(repo_id)
    return {b.name for b in refs.branches} | {t.name for t in refs.tags}


def require_hub(what: str, repo_ids: list[str] = (), revision: str | None = None, *,
                revisions: list[str] | None = None, cache_dir: str | None = None) -> None:
    """Raise `HubUnavailable` unless the hub is reachable or every repo is already in the local cache.

    With `revisions` (e.g. ["step0", "step1000"]), each one of each repo is checked: offline, it must be in
    the cache; online, it must be a branch or tag of the repo (`MissingRevisions` names the absent ones)."""
    if revisions:
        missing = {r: [v for v in revisions if not revision_cached(r, v, cache_dir)] for r in repo_ids}
        if not any(missing.values()):
            return
        if hub_reachable():
            for r in repo_ids:
                try:
                    have = hub_revisions(r)
                except Exception as e:  # noqa: BLE001 (unknown repo, gated repo, hub error)
                    raise MissingRevisions(f"{what}: cannot list the revisions of {r} on the hub: {e}") from e
                if absent := [v for v in revisions if v not in have]:
                    raise MissingRevisions(f"{what}: {r} has no revision(s) {absent[:8]}"
                                           f"{' ...' if len(absent) > 8 else ''} on the hub")
            return
        short = {r: v[:6] + (["..."] if len(v) > 6 else []) for r, v in missing.items() if v}
        raise HubUnavailable(
            f"{what} needs the Hugging Face hub ({HUB_HOST}), which this machine cannot reach, and these revisions "
            f"are not in the local cache{f' {cache_dir}' if cache_dir else ''}: {short}. Run it on a machine with "
            "network access (a GPU is advised), or use the offline demo: `make demo` / `feature-evolution demo`."
        )
    if repo_ids and all(cached_locally(r, revision) for r in repo_ids):
        return
    if hub_reachable():
        return
    raise HubUnavailable(
        f"{what} needs the Hugging Face hub ({HUB_HOST}), which this machine cannot reach, and "
        f"{', '.join(repo_ids) or 'the data'} is not in the local cache. Run it on a machine with network "
        "access (a GPU is advised), or use the offline demo: `make demo` / `feature-evolution demo`."
    )
