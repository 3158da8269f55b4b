"""Run a study as a chain of cached stages.

A stage's key is the hash of its own resolved config and the keys of the stages it reads from, so
changing the crosscoder's config redoes training, analysis and the report but not pre-training, and
re-running an unchanged study only re-checks the keys. Keys and timings go to `stages.json`.
A stage interrupted midway is simply run again with the same key: it resumes from its own checkpoints.
A stage whose key changed first runs its `clean` (partial state of another config is not resumed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosscoders.dataclass_cli import config_hash
from crosscoders.io import write_json


@dataclass
class Stage:
    name: str
    run: Callable[[], Any]
    """Does the work; reads and writes inside the run directory."""
    config: Any
    """What the stage's result depends on besides its inputs (dataclass or JSON-able)."""
    inputs: Sequence[str] = ()
    """Names of earlier stages whose results this one reads."""
    outputs: Sequence[str] = ()
    """Paths (relative to the run directory) that must exist for a cached result to count."""
    describe: str = ""
    """Where the result went, printed after the stage."""
    clean: Callable[[], Any] | None = None
    """Removes the stage's partial state when its key changed, so it starts afresh instead of resuming
    work done under another config (an unchanged key after an interruption resumes)."""


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_stages(
    run_dir: Path, stages: Sequence[Stage], force: Sequence[str] = (), log: Callable[[str], None] = print
) -> dict[str, dict]:
    """Run each stage unless its key and outputs say it is already done; return the stage records."""
    run_dir = Path(run_dir)
    record_path = run_dir / "stages.json"
    records = _load(record_path)
    keys: dict[str, str] = {}
    for st in stages:
        key = config_hash({"config": _jsonable(st.config), "inputs": [keys[i] for i in st.inputs]})
        keys[st.name] = key
        prev = records.get(st.name, {})
        done = prev.get("key") == key and prev.get("finished") and all((run_dir / o).exists() for o in st.outputs)
        if done and st.name not in force:
            log(f"[{st.name}] up to date (key {key}) -> {st.describe}")
            continue
        if prev.get("key") not in (None, key) and st.clean is not None:
            st.clean()
        log(f"[{st.name}] running ...")
        records[st.name] = {"key": key, "finished": False}
        write_json(record_path, records)
        t0 = time.perf_counter()
        st.run()
        seconds = time.perf_counter() - t0
        records[st.name] = {"key": key, "finished": True, "seconds": round(seconds, 2)}
        write_json(record_path, records)
        log(f"[{st.name}] done in {seconds:.1f}s -> {st.describe}")
    return records


def _jsonable(cfg: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    if is_dataclass(cfg):
        return json.loads(json.dumps(asdict(cfg), default=str))
    return json.loads(json.dumps(cfg, default=str))
