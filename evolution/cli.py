"""`feature-evolution <verb>`: the study's stages from the shell. This module only parses and dispatches;
every verb's work lives in its own module.

    feature-evolution demo                         # the whole study on the embedded default (runs/demo.toml)
    feature-evolution run runs/pythia-70m.toml     # any recipe; cached stages are skipped
    feature-evolution analyze runs/demo            # one stage of an existing run (re-run, forced)
    feature-evolution pretrain --run-dir runs/x --steps 500 ...   # stage verbs with their own flags
    feature-evolution compare runs/demo runs/demo-regularised     # two runs side by side
    feature-evolution plan runs/x.toml --gpus 1,8  # cost: downloads, forwards, disk, FLOPs, memory, hours
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crosscoders.errors import UserError, run_cli

STAGE_VERBS = {
    "corpus": "corpus", "pretrain": "pretrain", "harvest": "harvest", "train": "crosscoder",
    "analyze": "analyze", "geometry": "geometry", "evaluate": "evaluate", "phases": "phases", "report": "report",
    "numbers": "numbers",
    "interventions": "interventions",
}
# The demo recipe: the one in the current checkout, else the one beside this package's source tree.
DEMO_RECIPES = (Path("runs/demo.toml"), Path(__file__).resolve().parents[1] / "runs" / "demo.toml")


def _config_for(target: str):
    """A RunConfig from a recipe (.toml) or from a run directory's run.json, re-rooted where the directory
    is (a copied or renamed run directory works on itself, never on the directory its run.json names)."""
    from evolution.pipeline import load_recipe
    from evolution.recipe import load_run_config

    p = Path(target)
    if p.suffix == ".toml":
        return load_recipe(p)
    if (p / "run.json").exists():
        return load_run_config(p)
    raise UserError(f"{target}: neither a recipe (.toml) nor a run directory with run.json")


def _summary(cfg) -> None:
    run = cfg.run_dir
    lines = [f"\nResults of run {cfg.name!r} in {run}/:"]
    for rel, what in [("report.html", "the run report (open in a browser)"),
                      ("analysis/browser/index.html", "the feature browser"),
                      ("figures/phase_map.png", "the phase map"), ("figures/loss.png", "loss against references"),
                      ("phases.json", "phase boundary and signals"), ("analysis/features.csv", "per-feature table"),
                      ("crosscoder/eval.json", "crosscoder FVU / L0 / dead per snapshot"),
                      ("geometry.json", "geometry per snapshot and layer")]:
        if (run / rel).exists():
            lines.append(f"  {run / rel}: {what}")
    print("\n".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The CLI: a user error (bad recipe, store, missing hub, shapes) prints one line and returns 2;
    `--debug` or FEATURE_EVOLUTION_DEBUG=1 shows its traceback; other errors keep theirs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(_main, argv, f"feature-evolution {argv[0] if argv else ''}".strip())


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "plan":  # a recipe's cost, running nothing (evolution/plan.py)
        from evolution.plan import plan_cli

        plan_cli(argv[1:])
        return 0
    verbs = ["demo", "run", "compare", *STAGE_VERBS]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in verbs:
        print(__doc__.strip() + "\n\nverbs: " + ", ".join(verbs) + "\n--debug (any verb): show tracebacks of user errors",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    verb, rest = argv[0], argv[1:]

    # Stage verbs with flags of their own (the module's dataclass config is the CLI).
    flag_clis = {"pretrain": "evolution.sources.pretrain:pretrain_cli", "geometry": "evolution.geometry.stage:geometry_cli",
                 "phases": "evolution.phases.stage:phases_cli", "evaluate": "evolution.stage_cli:evaluate_cli",
                 "interventions": "evolution.stage_cli:interventions_cli"}
    if verb in flag_clis and rest and rest[0].startswith("-") and rest[0] not in ("-h", "--help"):
        mod, fn = flag_clis[verb].split(":")
        getattr(__import__(mod, fromlist=[fn]), fn)(rest)
        return 0
    if verb == "compare":  # two run directories side by side (evolution/report/compare.py)
        from evolution.report.compare import compare_cli

        compare_cli(rest)
        return 0
    if verb == "train" and rest and rest[0].startswith("--store"):
        from crosscoders.train import main as train_main

        train_main(rest)
        return 0

    from evolution.pipeline import run_study

    p = argparse.ArgumentParser(prog=f"feature-evolution {verb}")
    if verb != "demo":
        p.add_argument("target", help="recipe (runs/*.toml) or run directory (runs/<name>)")
    p.add_argument("--name", help="run name (default: the recipe's)")
    p.add_argument("--force", default="", help="comma-separated stages to redo even if cached")
    ns = p.parse_args(rest)
    if verb == "demo":
        from evolution.pipeline import RunConfig, load_recipe

        recipe = next((r for r in DEMO_RECIPES if r.exists()), None)
        if recipe is None:
            print("runs/demo.toml not found: running the built-in RunConfig defaults", file=sys.stderr)
        cfg = load_recipe(recipe, name=ns.name) if recipe else RunConfig(name=ns.name or "demo")
    else:
        cfg = _config_for(ns.target)
        if ns.name:
            from crosscoders.dataclass_cli import replace

            cfg = replace(cfg, name=ns.name)
    force = tuple(s for s in ns.force.split(",") if s)
    only = (STAGE_VERBS[verb],) if verb in STAGE_VERBS else ()
    run_study(cfg, force=force, only=only)
    _summary(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
