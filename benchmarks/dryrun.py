"""The Pythia-160M study at its real width on this machine: every stage, its time and peak memory, against `plan`.

    python -m benchmarks.dryrun [--recipe runs/pythia-160m-dryrun.toml] [--name dryrun]

Builds the recipe's offline hub cache of random-weight Pythia-160M `step{N}` revisions (evolution/sources/
standin.py) when it is missing, then runs each stage of the study in a process of its own
(`feature-evolution <stage>` semantics: `run_study(cfg, only=[stage])`, earlier stages cached), recording
wall time and the process's peak RSS. A process that only imports the pipeline and transformer-lens gives the
baseline RSS (Python, torch, transformers, transformer-lens); `above_baseline_GiB` is what the stage itself needed, compared with
`evolution.memory.stage_memory` for the same shape (`ratio` = measured / predicted). JSON goes to stdout and to
benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import cpu_info, peak_rss

GiB = 1 << 30


def _child(recipe: str, stage: str | None) -> None:
    """One stage (or nothing: the baseline) in this process; prints {"seconds", "peak_rss"}."""
    from evolution.pipeline import run_study
    from evolution.recipe import load_recipe

    if not stage:  # the baseline holds the libraries every model-running stage loads, not their data
        import transformer_lens  # noqa: F401
        import transformers  # noqa: F401
    t0 = time.perf_counter()
    if stage:
        run_study(load_recipe(recipe), only=[stage], log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "peak_rss": peak_rss()}))


def _run_child(recipe: str, stage: str | None, env: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.dryrun", "--recipe", recipe, "--child"] + (["--stage", stage] if stage else [])
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        return {"ok": False, "returncode": p.returncode}
    return {"ok": True, **json.loads(p.stdout.strip().splitlines()[-1])}


def dryrun(recipe: str, stages: list[str] | None = None) -> dict:
    from evolution.memory import stage_memory
    from evolution.pipeline import study_stages
    from evolution.recipe import load_recipe
    from evolution.sources.snapshot_source import parse_source
    from evolution.sources.standin import build_pythia_standin

    cfg = load_recipe(recipe)
    kind, repo = parse_source(cfg.snapshots.source)
    if kind != "hf" or not cfg.snapshots.cache_dir or not cfg.snapshots.local_files_only:
        raise SystemExit(f"{recipe}: the dry run needs an hf: source with cache_dir and local_files_only = true")
    t0 = time.perf_counter()
    build_pythia_standin(cfg.snapshots.cache_dir, cfg.snapshots.steps, repo)
    build_s = time.perf_counter() - t0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    base = _run_child(recipe, None, env)
    predicted = stage_memory(cfg)
    rows = []
    for st in study_stages(cfg):
        if stages and st.name not in stages:
            continue
        r = _run_child(recipe, st.name, env)
        row = {"stage": st.name, **r}
        if r["ok"]:
            row["peak_GiB"] = round(r["peak_rss"] / GiB, 3)
            row["above_baseline_GiB"] = round((r["peak_rss"] - base["peak_rss"]) / GiB, 3)
        if st.name in predicted:
            row["predicted_GiB"] = round(predicted[st.name] / GiB, 3)
            if r["ok"]:
                row["ratio"] = round(row["above_baseline_GiB"] / row["predicted_GiB"], 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"recipe": recipe, "cache_build_s": round(build_s, 1), "baseline_GiB": round(base["peak_rss"] / GiB, 3),
            "cpu": cpu_info().get("cpu", "unknown"), "torch_threads": __import__("torch").get_num_threads(), "stages": rows,
            "all_ok": all(r["ok"] for r in rows)}


def format_table(out: dict) -> str:
    lines = [f"{'stage':<14}{'seconds':>9}{'peak GiB':>10}{'above base':>12}{'plan GiB':>10}{'ratio':>8}"]
    for r in out["stages"]:
        if not r["ok"]:
            lines.append(f"{r['stage']:<14} FAILED (exit {r['returncode']})")
            continue
        lines.append(f"{r['stage']:<14}{r['seconds']:>9.1f}{r['peak_GiB']:>10.2f}{r['above_baseline_GiB']:>12.2f}"
                     f"{r.get('predicted_GiB', float('nan')):>10.2f}{r.get('ratio', float('nan')):>8.2f}")
    lines.append(f"baseline (imports) {out['baseline_GiB']:.2f} GiB; cache built in {out['cache_build_s']} s; {out['cpu']}")
    return "\n".join(lines)


def markdown_table(out: dict) -> str:
    """The stage table as the README shows it."""
    rows = ["| stage | seconds | peak GiB | above the idle process | predicted (`stage_memory`) | measured / predicted |",
            "|---|---|---|---|---|---|"]
    for r in out["stages"]:
        if not r["ok"]:
            rows.append(f"| {r['stage']} | failed (exit {r['returncode']}) | | | | |")
            continue
        pred = f"{r['predicted_GiB']:.2f}" if "predicted_GiB" in r else "—"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "—"
        rows.append(f"| {r['stage']} | {r['seconds']:.0f} | {r['peak_GiB']:.2f} | {r['above_baseline_GiB']:.2f} | "
                    f"{pred} | {ratio} |")
    total = sum(r.get("seconds", 0) for r in out["stages"])
    rows.append(f"| all | {total:.0f} | | | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dryrun", description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="runs/pythia-160m-dryrun.toml")
    ap.add_argument("--name", default="dryrun")
    ap.add_argument("--results-dir", default="benchmarks/results")
    ap.add_argument("--stages", default="", help="comma-separated stages to run (default: all)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.child:
        _child(ns.recipe, ns.stage)
        return None
    out = dryrun(ns.recipe, [s for s in ns.stages.split(",") if s] or None)
    print(format_table(out), file=sys.stderr)
    Path(ns.results_dir).mkdir(parents=True, exist_ok=True)
    (Path(ns.results_dir) / f"{ns.name}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
