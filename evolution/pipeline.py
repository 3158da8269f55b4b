"""The study: the stage list and the runner. Nothing else lives here.

    corpus → pretrain → numbers → harvest → crosscoder → analyze → geometry → evaluate → interventions
           → phases → report

Each stage is a module's `*_stage(ctx)` and the table of the recipe that configures it (`RunConfig.<table>`,
the dataclass that is also its CLI: `feature-evolution <stage> RUN --field value`). A stage's key is the hash
of its config and of the keys of the stages it reads from, so changing the crosscoder's config redoes training,
analysis and the report but not pre-training, and re-running an unchanged study only re-checks the keys
(`stages.json`). An interrupted stage is run again with the same key and resumes from its own checkpoints; a
stage whose key changed first cleans its partial state. A stage with `ranks > 1` is started as that many
torchrun ranks of `feature-evolution <stage> RUN` (each builds the run context with its mesh), and the runner
waits for them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from crosscoders.dataclass_cli import config_hash, to_dict
from crosscoders.errors import UserError
from crosscoders.io import write_json
from crosscoders.mesh import Mesh
from evolution.context import RunContext
from evolution.crosscoder import crosscoder_stage
from evolution.crosscoder.stage import crosscoder_ranks
from evolution.evaluate import evaluate_stage
from evolution.features.analyze import analyze_stage
from evolution.geometry.stage import geometry_stage
from evolution.harvest import harvest_stage
from evolution.harvest.stage import harvest_ranks
from evolution.interventions.stage import interventions_stage
from evolution.memory import check_fits
from evolution.numbers.stage import numbers_on, numbers_stage
from evolution.phases.stage import phases_stage
from evolution.recipe import RunConfig
from evolution.report.html import report_stage
from evolution.sources.hub import require_hub
from evolution.sources.pretrain import keyed_config
from evolution.sources.snapshot_source import hub_revision, parse_source
from evolution.sources.stages import corpus_stage, pretrain_stage


@dataclass
class Stage:
    name: str
    run: Callable[[RunContext], Any]
    """Does the work; reads and writes inside the run directory."""
    table: str | None
    """The RunConfig table that configures it (its fields are the stage verb's flags); None: no config."""
    inputs: Callable[[RunConfig], list[str]] = lambda cfg: []
    """Names of earlier stages whose results this one reads."""
    outputs: Callable[[RunConfig], list[str]] = lambda cfg: []
    """Paths (relative to the run directory) that must exist for a cached result to count."""
    describe: str = ""
    """Where the result went, printed after the stage ({run} is the run directory)."""
    key: Callable[[RunConfig], Any] | None = None
    """What the result depends on besides its inputs (default: its table)."""
    clean: Callable[[RunConfig], list[str]] = lambda cfg: []
    """Paths of partial state removed when the key changed (so it starts afresh instead of resuming another config)."""
    enabled: Callable[[RunConfig], bool] = lambda cfg: True
    ranks: Callable[[RunConfig], int] = lambda cfg: 1
    """Processes the stage runs on (torchrun ranks when > 1)."""
    source_parallel: Callable[[RunConfig], int] = lambda cfg: 1
    """Ranks of its mesh that split the snapshots (the rest split the batch)."""
    device: Callable[[RunConfig], str] = lambda cfg: "cpu"

    def key_of(self, cfg: RunConfig) -> Any:
        return self.key(cfg) if self.key is not None else getattr(cfg, self.table) if self.table else {"version": 1}


def _snapshot_inputs(cfg: RunConfig) -> list[str]:
    return ["pretrain"] if cfg.snapshots.source == "pretrain" else ["corpus"]


def _with_snapshots(table: str) -> Callable[[RunConfig], dict]:
    return lambda cfg: {table: getattr(cfg, table), "snapshots": cfg.snapshots}


def _harvest_key(cfg: RunConfig) -> dict:
    """The harvest config's repr, without the stream fields in store mode, so that runs harvested before `mode`
    existed keep their cached stages (a dataclass inside a dict is hashed by repr)."""
    h = cfg.harvest
    key = str(h)
    if h.mode == "store":
        key = key.replace(f", mode='store', stream_buffer_seqs={h.stream_buffer_seqs}, "
                          f"stream_shards={h.stream_shards})", ")")
    return {"harvest": key, "snapshots": cfg.snapshots}


STAGES: list[Stage] = [
    Stage("corpus", corpus_stage, "corpus",
          # local:/hf: corpora are tokenized by the snapshots' tokenizer, so they depend on the snapshot source too
          key=lambda c: c.corpus if c.snapshots.source == "pretrain" else {"corpus": c.corpus, "snapshots": c.snapshots},
          outputs=lambda c: ["corpus/tokens.safetensors"], describe="{run}/corpus/ (tokens, tokenizer, meta.json)"),
    Stage("pretrain", pretrain_stage, "pretrain", key=lambda c: keyed_config(c.pretrain),
          enabled=lambda c: c.snapshots.source == "pretrain", inputs=lambda c: ["corpus"],
          outputs=lambda c: ["pretrain/log.jsonl", "figures/loss.png"], clean=lambda c: ["pretrain", "snapshots"],
          describe="{run}/snapshots/step*/, {run}/pretrain/log.jsonl, {run}/figures/loss.png"),
    Stage("numbers", numbers_stage, "numbers", key=_with_snapshots("numbers"), enabled=numbers_on,
          inputs=_snapshot_inputs, outputs=lambda c: ["numbers.json"],
          describe="{run}/numbers.json, {run}/figures/numbers.png"),
    Stage("harvest", harvest_stage, "harvest", key=_harvest_key, inputs=_snapshot_inputs,
          outputs=lambda c: [f"activations/{c.harvest.hook}/manifest.json"],
          clean=lambda c: [f"activations/{c.harvest.hook}", f"activations_eval/{c.harvest.hook}"],
          ranks=harvest_ranks, device=lambda c: c.harvest.device,
          describe="{run}/activations/<hook>/ (shards + manifest.json)"),
    Stage("crosscoder", crosscoder_stage, "train", inputs=lambda c: ["harvest"],
          outputs=lambda c: ["crosscoder/weights.safetensors", "crosscoder/eval.json"],
          clean=lambda c: ["crosscoder/checkpoint"], ranks=crosscoder_ranks,
          source_parallel=lambda c: c.parallel.source_parallel, device=lambda c: c.train.device,
          describe="{run}/crosscoder/ (cfg.json, weights.safetensors, train_log.jsonl, eval.json, quality.png)"),
    Stage("analyze", analyze_stage, "analyze", inputs=lambda c: ["crosscoder"],
          outputs=lambda c: ["analysis/features.csv"],
          describe="{run}/analysis/ (features.csv, timelines.safetensors, figures/, browser/index.html)"),
    Stage("geometry", geometry_stage, "geometry", inputs=_snapshot_inputs, outputs=lambda c: ["geometry.json"],
          describe="{run}/geometry.json, {run}/figures/geometry_*.png"),
    Stage("evaluate", evaluate_stage, "evaluate", key=_with_snapshots("evaluate"), inputs=_snapshot_inputs,
          outputs=lambda c: ["eval/summary.json"],
          describe="{run}/eval/ (per-token loss and KL per snapshot, summary.json)"),
    Stage("interventions", interventions_stage, "interventions", key=_with_snapshots("interventions"),
          enabled=lambda c: c.interventions.enabled,
          inputs=lambda c: _snapshot_inputs(c) + (["crosscoder", "analyze"] if c.interventions.logit_effects else []),
          outputs=lambda c: ["interventions.json"],
          describe="{run}/interventions.json, {run}/figures/interventions_*.png, logit_lens.png"),
    Stage("phases", phases_stage, "phases",
          inputs=lambda c: [n for n in ("pretrain", "analyze", "geometry", "evaluate") if by_name(n).enabled(c)],
          outputs=lambda c: ["phases.json"], describe="{run}/phases.json, {run}/figures/phase_map.png"),
    Stage("report", report_stage, None,
          inputs=lambda c: ["phases", "analyze", "crosscoder"]
          + [n for n in ("numbers", "interventions") if by_name(n).enabled(c)],
          outputs=lambda c: ["report.html"], describe="{run}/report.html"),
]
"""The study, in data-flow order."""


def by_name(name: str) -> Stage:
    for st in STAGES:
        if st.name == name:
            return st
    raise UserError(f"unknown stage {name!r}; the stages are {[s.name for s in STAGES]}")


def _jsonable(cfg: Any) -> Any:
    if is_dataclass(cfg):
        return json.loads(json.dumps(asdict(cfg), default=str))
    return json.loads(json.dumps(cfg, default=str))


def _load_records(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _needed(cfg: RunConfig, stages: list[Stage], only: Sequence[str]) -> list[Stage]:
    """The stages `only` names and every stage they read from, transitively, in order."""
    want, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name not in want:
            want.add(name)
            todo += by_name(name).inputs(cfg)
    return [s for s in stages if s.name in want]


def study_stages(cfg: RunConfig, only: Sequence[str] = ()) -> list[Stage]:
    """The stages a recipe runs: every enabled one, or those `only` names and what they read from."""
    stages = [s for s in STAGES if s.enabled(cfg) or s.name in only]
    return _needed(cfg, stages, only) if only else stages


def run_study(cfg: RunConfig, force: Sequence[str] = (), only: Sequence[str] = (),
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Run (or resume) every enabled stage; with `only`, those stages (forced) and what they read from.
    Returns stages.json's records."""
    for name in only:
        by_name(name)  # an unknown name is an error before anything runs
    stages = study_stages(cfg, only)
    force = tuple(force) + tuple(only)
    ctx = RunContext(cfg)  # the one snapshot source every stage of this run gets
    kind, repo = parse_source(cfg.snapshots.source)
    if kind == "hf":
        s = cfg.snapshots
        require_hub(f"recipe {cfg.name!r} (checkpoints of {repo})", [repo], cache_dir=s.cache_dir,
                    # transformer-lens reads the architecture from `main`, the weights from each revision
                    revisions=["main"] + [hub_revision(repo, step) for step in ctx.steps])
    check_fits(cfg, [s.name for s in stages])  # devices exist and every stage fits its memory, before any model runs
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(cfg.run_dir / "run.json", to_dict(cfg))
    return run_stages(ctx, stages, force, log)


def run_stages(ctx: RunContext, stages: Sequence[Stage], force: Sequence[str] = (),
               log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run each stage unless its key and outputs say it is already done; return the stage records."""
    cfg, run = ctx.cfg, ctx.run_dir
    record_path = run / "stages.json"
    records = _load_records(record_path)
    keys: dict[str, str] = {}
    for st in stages:
        key = config_hash({"config": _jsonable(st.key_of(cfg)),
                           "inputs": [keys[i] for i in st.inputs(cfg) if i in keys]})
        keys[st.name] = key
        describe = st.describe.format(run=run)
        prev = records.get(st.name, {})
        done = prev.get("key") == key and prev.get("finished") and all((run / o).exists() for o in st.outputs(cfg))
        if done and st.name not in force:
            log(f"[{st.name}] up to date (key {key}) -> {describe}")
            continue
        if prev.get("key") not in (None, key):
            for p in st.clean(cfg):
                shutil.rmtree(run / p, ignore_errors=True)
        log(f"[{st.name}] running ...")
        records[st.name] = {"key": key, "finished": False}
        write_json(record_path, records)
        t0 = time.perf_counter()
        if st.ranks(cfg) > 1:
            launch(cfg, st)
        else:
            st.run(ctx)
        seconds = time.perf_counter() - t0
        records[st.name] = {"key": key, "finished": True, "seconds": round(seconds, 2)}
        write_json(record_path, records)
        log(f"[{st.name}] done in {seconds:.1f}s -> {describe}")
    return records


def launch(cfg: RunConfig, st: Stage) -> None:
    """`torchrun --standalone --nproc_per_node=N -m evolution.cli STAGE RUN_DIR`, output on this terminal (for
    several nodes run that command yourself with torchrun's --nnodes/--rdzv flags)."""
    n = st.ranks(cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "evolution.cli", st.name, str(cfg.run_dir)]
    print(f"{st.name}: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise UserError(f"the {n} {st.name} ranks failed (torchrun exit code {rc}; each rank's message is above); "
                        "rerun the stage to resume from the last checkpoint every rank completed")


def run_rank(cfg: RunConfig, name: str) -> None:
    """This process's share of stage `name` as one rank of the torchrun job `launch` started (run.json is the
    recipe; the launching process keeps stages.json)."""
    import torch.distributed as dist

    st = by_name(name)
    backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
    mesh = Mesh.init(st.source_parallel(cfg), device=st.device(cfg), backend=backend)
    try:
        st.run(RunContext(cfg, mesh))
    finally:
        dist.destroy_process_group()
