"""`feature-evolution <verb>`: the study from the shell. The stage verbs are generated from the stage list
(`evolution.pipeline.STAGES`); each takes its stage's config fields as flags (the dataclass is the CLI).

    feature-evolution demo                              # the whole study on the embedded default (runs/demo.toml)
    feature-evolution run runs/pythia-70m.toml          # any recipe (or run directory); cached stages are skipped
    feature-evolution evaluate runs/demo --batch-size 8 # one stage on a run, with its own flags (--help lists them)
    feature-evolution compare runs/demo runs/demo-regularised     # two runs side by side
    feature-evolution plan runs/pythia-160m-ge2025.toml --gpus 1,8   # cost: downloads, forwards, disk, FLOPs, hours

A stage verb redoes that stage (and runs what it reads from, where not up to date), with the flags written into
the run's run.json. Started by torchrun (the runner does this for `[parallel] nproc_per_node > 1`), a stage verb
runs this rank's share of the stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crosscoders.dataclass_cli import add_config_arguments, config_from_arguments, replace
from crosscoders.errors import UserError, run_cli
from evolution.context import under_torchrun
from evolution.pipeline import STAGES, by_name, run_rank, run_study
from evolution.plan import plan_cli
from evolution.recipe import RunConfig, load_recipe, load_run_config
from evolution.report.compare import compare_cli

# The demo recipe: the one in the current checkout, else the one beside this package's source tree.
DEMO_RECIPES = (Path("runs/demo.toml"), Path(__file__).resolve().parents[1] / "runs" / "demo.toml")
OTHER_VERBS = {"demo": "the whole study on runs/demo.toml", "run": "the whole study on a recipe or run directory",
               "compare": "two run directories side by side", "plan": "a recipe's cost, running nothing"}


def config_for(target: str) -> RunConfig:
    """A RunConfig from a recipe (.toml) or from a run directory's run.json, re-rooted where the directory
    is (a copied or renamed run directory works on itself, never on the directory its run.json names)."""
    p = Path(target)
    if p.suffix == ".toml":
        return load_recipe(p)
    if (p / "run.json").exists():
        return load_run_config(p)
    raise UserError(f"{target}: not a run directory (no run.json), nor a recipe (.toml)")


def stage_parser(name: str) -> argparse.ArgumentParser:
    """`feature-evolution <stage> RUN [--field value ...]`: the stage's config fields as flags."""
    st = by_name(name)
    p = argparse.ArgumentParser(prog=f"feature-evolution {name}",
                                description=f"the {name} stage: {st.describe.format(run='RUN')}")
    p.add_argument("target", help="run directory (runs/<name>) or recipe (runs/*.toml)")
    if st.table:
        add_config_arguments(p, RunConfig.__dataclass_fields__[st.table].default_factory,
                             title=f"[{st.table}] ({RunConfig.__dataclass_fields__[st.table].type})")
    return p


def usage() -> str:
    lines = [__doc__.strip(), "", "verbs:"]
    lines += [f"  {v:<14} {what}" for v, what in OTHER_VERBS.items()]
    lines += [f"  {s.name:<14} stage: {s.describe.format(run='RUN')}" for s in STAGES]
    return "\n".join(lines + ["", "--debug (any verb): show tracebacks of user errors"])


def _summary(cfg: RunConfig) -> None:
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
    stage_names = [s.name for s in STAGES]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in [*OTHER_VERBS, *stage_names]:
        print(usage(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    verb, rest = argv[0], argv[1:]
    if verb == "plan":
        plan_cli(rest)
        return 0
    if verb == "compare":
        compare_cli(rest)
        return 0
    if verb in stage_names:
        ns = vars(stage_parser(verb).parse_args(rest))
        cfg = config_for(ns.pop("target"))
        table = by_name(verb).table
        if table and ns:
            cfg = replace(cfg, **{table: config_from_arguments(getattr(cfg, table), ns)})
        if under_torchrun():  # one rank of the job the runner launched
            run_rank(cfg, verb)
            return 0
        run_study(cfg, only=(verb,))
        _summary(cfg)
        return 0
    p = argparse.ArgumentParser(prog=f"feature-evolution {verb}")
    if verb == "run":
        p.add_argument("target", help="recipe (runs/*.toml) or run directory (runs/<name>)")
    p.add_argument("--name", help="run name (default: the recipe's)")
    p.add_argument("--force", default="", help="comma-separated stages to redo even if cached")
    ns = p.parse_args(rest)
    if verb == "demo":
        recipe = next((r for r in DEMO_RECIPES if r.exists()), None)
        if recipe is None:
            print("runs/demo.toml not found: running the built-in RunConfig defaults", file=sys.stderr)
        cfg = load_recipe(recipe, name=ns.name) if recipe else RunConfig(name=ns.name or "demo")
    else:
        cfg = config_for(ns.target)
        if ns.name:
            cfg = replace(cfg, name=ns.name)
    run_study(cfg, force=tuple(s for s in ns.force.split(",") if s))
    _summary(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
