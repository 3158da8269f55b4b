"""The published numbers (docs/demo.json, README's block) are the code's: the README's block is rendered from
the JSON (fast), and a fresh run of the demo recipe gives the JSON's numbers (slow, `make reproduce` writes them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evolution.report.published import published, readme_block, render

ROOT = Path(__file__).resolve().parents[3]


def test_the_readme_block_is_docs_demo_json():
    numbers = json.loads((ROOT / "docs" / "demo.json").read_text())
    block = readme_block((ROOT / "README.md").read_text())
    assert block is not None, "README.md has no published block"
    assert block == render(numbers), "README's published block differs from docs/demo.json: run `make reproduce`"


def test_published_reads_a_run(tiny_run):
    _, run, _ = tiny_run
    n = published(run)
    ph = json.loads((run / "phases.json").read_text())
    assert n["phases"]["boundary_step"] == ph.get("boundary_step") and set(n["phases"]["signals"]) == set(ph["signals"])
    assert n["turning_point"].startswith(("step ", "none"))
    assert "Turning point:" in render(n) and render(n).count("|") > 10


@pytest.mark.slow
def test_a_fresh_demo_run_gives_the_published_numbers(tmp_path):
    """The demo recipe end to end (~6-10 min on 2 cores), fp32 as the suite pins it."""
    from evolution.pipeline import run_study
    from evolution.recipe import load_recipe

    cfg = load_recipe(ROOT / "runs" / "demo.toml", root=str(tmp_path))
    run_study(cfg)
    got, want = published(cfg.run_dir), json.loads((ROOT / "docs" / "demo.json").read_text())
    assert got["phases"] == want["phases"] and got["turning_point"] == want["turning_point"]
    assert got["hierarchy"] == want["hierarchy"] and got["learned_steps"] == want["learned_steps"]
    for k, v in want["crosscoder"].items():
        assert got["crosscoder"][k] == pytest.approx(v, rel=0.02), k
