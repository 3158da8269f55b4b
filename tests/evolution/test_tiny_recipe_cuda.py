"""The tiny recipe end to end with every device field set to "cuda" (a GPU box only: `-m cuda`,
benchmarks/gpu_check.sh); the CPU run of the same recipe is the session's `tiny_run` (tests/evolution/test_pipeline.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.conftest import TINY_RECIPE

DEVICE_TABLES = ("pretrain", "harvest", "train", "analyze", "geometry")
"""Every recipe table with a `device` field (interventions and evaluate run on the snapshot source's, harvest's)."""


def cuda_recipe(root):
    from evolution.recipe import RunConfig, load_recipe

    cfg = load_recipe(TINY_RECIPE, root=str(root), name="tiny-cuda")
    tables = [f.name for f in dataclasses.fields(RunConfig)
              if dataclasses.is_dataclass(getattr(cfg, f.name)) and hasattr(getattr(cfg, f.name), "device")]
    assert sorted(tables) == sorted(DEVICE_TABLES), tables  # a new device field must be set here too
    cfg = dataclasses.replace(cfg, **{t: dataclasses.replace(getattr(cfg, t), device="cuda") for t in DEVICE_TABLES})
    return dataclasses.replace(cfg, interventions=dataclasses.replace(cfg.interventions, enabled=True))


@pytest.mark.cuda
def test_tiny_recipe_runs_every_stage_on_cuda(tmp_path):
    from evolution.pipeline import run_study

    cfg = cuda_recipe(tmp_path)
    run_study(cfg)
    records = json.loads((cfg.run_dir / "stages.json").read_text())
    assert all(r["finished"] for r in records.values()), records
    assert "interventions" in records
    ev = json.loads((cfg.run_dir / "crosscoder" / "eval.json").read_text())
    assert all(0 <= f < 1.2 for f in ev["fvu"])
    geo = json.loads((cfg.run_dir / "geometry.json").read_text())
    assert geo["complete"] and all(v is not None for v in geo["metrics"]["anisotropy"][0])
    for rel in ["figures/loss.png", "analysis/browser/index.html", "report.html", "interventions.json", "eval/summary.json"]:
        assert (cfg.run_dir / rel).stat().st_size > 0, rel


def test_the_cuda_recipe_sets_every_device_field(tmp_path):
    cfg = cuda_recipe(tmp_path)
    assert all(getattr(cfg, t).device == "cuda" for t in DEVICE_TABLES)
