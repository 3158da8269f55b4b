"""Every command the README, docs/ and the CLI docstrings show parses with the current code: the stage verbs
with their flags, `python -m crosscoders.train` (also under torchrun), and `feature-evolution plan` runs for
real (it costs nothing). A renamed verb or flag fails here, not in a user's terminal."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "evolution" / "cli.py",
           ROOT / "crosscoders" / "train.py", ROOT / "evolution" / "crosscoder" / "stage.py"]
STARTS = ("feature-evolution ", "python -m crosscoders.train ", "torchrun ")
PLACEHOLDERS = {"RECIPE": "runs/demo.toml", "RECIPE.toml": "runs/demo.toml", "N": "2", "P": "2",
                "--nproc_per_node=N": "--nproc_per_node=2"}


def documented() -> list[tuple[str, str]]:
    """(where, command) for every command line in fenced blocks and inline code spans."""
    out = []
    for path in SOURCES:
        text = path.read_text()
        spans = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
        if path.suffix == ".py":
            spans += [line.strip() for line in text.splitlines()]
        for span in spans:
            for line in span.splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith(STARTS) and not any(c in line for c in "[]|…{}<>") and "..." not in line:
                    out.append((path.name, line))
    return sorted(set(out))


COMMANDS = documented()


def test_the_docs_show_commands():
    verbs = {c.split()[1] for _, c in COMMANDS if c.startswith("feature-evolution ")}
    assert {"demo", "run", "evaluate", "analyze", "plan", "compare", "crosscoder"} <= verbs, verbs


@pytest.mark.parametrize("where, command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_command_parses(where, command, capsys):
    from crosscoders.train import parser as train_parser
    from evolution.cli import OTHER_VERBS, stage_parser
    from evolution.pipeline import STAGES
    from evolution.plan import plan_cli

    argv = [PLACEHOLDERS.get(a, a) for a in shlex.split(command)]
    if argv[0] == "torchrun":  # torchrun [its flags] -m MODULE ARGS: the module's own arguments
        argv = ["python", *argv[argv.index("-m"):]]
    if argv[:3] == ["python", "-m", "crosscoders.train"]:
        if argv[3:]:  # a bare mention names the entry; with arguments they must parse
            train_parser().parse_args(argv[3:])
        return
    if argv[:3] == ["python", "-m", "evolution.cli"]:
        argv = ["feature-evolution", *argv[3:]]
    verb, rest = argv[1], argv[2:]
    stages = [s.name for s in STAGES]
    assert verb in stages or verb in OTHER_VERBS, f"{where}: {command}: no verb {verb!r}"
    if not rest:  # the verb named in prose or a table
        return
    if verb in stages:
        stage_parser(verb).parse_args(rest)
    elif verb == "plan":
        plan_cli([a for a in rest if a != "--json"] + ["--json"])
    elif verb == "run":
        assert (ROOT / rest[0]).exists() or not rest[0].endswith(".toml"), f"{where}: {rest[0]} does not exist"
