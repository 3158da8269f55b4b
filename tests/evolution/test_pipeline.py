"""The whole study end to end on the tiny recipe: every stage's output, caching, and clear failures."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from evolution.context import RunContext
from evolution.pipeline import run_stages, run_study, study_stages
from evolution.recipe import load_recipe

STAGES = ["corpus", "pretrain", "harvest", "crosscoder", "analyze", "geometry", "evaluate", "phases", "report"]


def test_every_stage_writes_its_outputs(tiny_run):
    cfg, run, _ = tiny_run
    records = json.loads((run / "stages.json").read_text())
    assert list(records) == STAGES and all(r["finished"] for r in records.values())
    steps = sorted(int(p.name.removeprefix("step")) for p in (run / "snapshots").iterdir())
    assert steps[:4] == [0, 1, 2, 4] and steps[-1] == cfg.pretrain.steps
    ev = json.loads((run / "crosscoder" / "eval.json").read_text())
    assert ev["sources"] == [f"step{s}" for s in steps]
    assert len(ev["fvu"]) == len(steps) and all(0 <= f < 1.2 for f in ev["fvu"])
    feats = pd.read_csv(run / "analysis" / "features.csv")
    assert len(feats) == cfg.train.crosscoder.d_sae
    assert set(feats["peak_step"].dropna().astype(int)) <= set(steps)
    geo = json.loads((run / "geometry.json").read_text())
    assert geo["steps"] == steps
    phases = json.loads((run / "phases.json").read_text())
    assert "boundary_step" in phases and phases["signals"]
    for rel in ["figures/loss.png", "figures/phase_map.png", "analysis/browser/index.html", "report.html"]:
        assert (run / rel).stat().st_size > 0, rel


def test_rerun_skips_and_changed_config_redoes_downstream(tiny_run):
    cfg, run, _ = tiny_run
    lines: list[str] = []
    run_stages(RunContext(cfg), study_stages(cfg), log=lines.append)
    assert all("up to date" in line for line in lines), lines
    # a different probe setting invalidates analysis and what reads it, not the expensive stages
    from crosscoders.dataclass_cli import replace

    cfg2 = replace(cfg, analyze={**cfg.analyze.__dict__, "threshold": 0.4})
    lines.clear()
    run_stages(RunContext(cfg2), study_stages(cfg2), log=lines.append)
    ran = [line.split("]")[0].strip("[") for line in lines if "running" in line]
    assert ran == ["analyze", "phases", "report"]


def test_hub_recipe_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from evolution.sources.hub import HubUnavailable

    cfg = load_recipe("runs/pythia-70m.toml", root=str(tmp_path))
    with pytest.raises(HubUnavailable, match="needs the Hugging Face hub"):
        run_study(cfg)
    assert not (tmp_path / cfg.name / "stages.json").exists()


def test_unknown_recipe_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nstepz = 3\n')
    with pytest.raises(ValueError, match="bad.toml.*unknown TrainConfig field.*stepz"):
        load_recipe(bad)
