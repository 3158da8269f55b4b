"""Shared fixtures: one tiny end-to-end study per test session (the pipeline, report and notebook tests read it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TINY_RECIPE = Path(__file__).parent / "data" / "tiny.toml"

# One precision in every test process and the torchrun ranks they start: "auto" picks bf16 where the CPU has
# bf16 units and the probe's verdict can differ between processes; tests that compare numbers need fp32
# (crosscoders/precision.py; tests/crosscoders/test_precision.py unsets this to test the probe).
os.environ.setdefault("CROSSCODERS_AUTO_PRECISION", "fp32")

# 2-core CI machines: one intra-op thread per process keeps test timings predictable.
torch.set_num_threads(max(1, min(2, int(os.environ.get("OMP_NUM_THREADS", "2")))))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A complete run directory of the tiny recipe (corpus → ... → report), built once per session."""
    from evolution.pipeline import run_study
    from evolution.recipe import load_recipe

    root = tmp_path_factory.mktemp("runs")
    cfg = load_recipe(TINY_RECIPE, root=str(root))
    records = run_study(cfg)
    return cfg, cfg.run_dir, records


@pytest.fixture(scope="session")
def tiny_numbers_run(tmp_path_factory):
    """The tiny study with the planted number mechanism (tests/data/tiny-numbers.toml), every stage."""
    from evolution.pipeline import run_study
    from evolution.recipe import load_recipe

    root = tmp_path_factory.mktemp("runs_numbers")
    cfg = load_recipe(Path(__file__).parent / "data" / "tiny-numbers.toml", root=str(root))
    run_study(cfg)
    return cfg, cfg.run_dir


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: without one they are skipped, saying why (CI and the 2-core boxes
    have none; benchmarks/gpu_check.sh runs them on a GPU machine with `-m cuda`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                   "run `bash benchmarks/gpu_check.sh` on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# `DEVICES` parametrises a test body over "cpu" (the normal suite) and "cuda" (marked: a GPU box only).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
