"""benchmarks/gpu_check: the GPU box's one script parses, and its benchmark runs at toy shapes on the CPU with
every part recorded in the JSON (the figures themselves come from a GPU: `bash benchmarks/gpu_check.sh`)."""

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.gpu_check import main

ROOT = Path(__file__).parents[2]


def test_gpu_check_sh_parses_and_names_its_wheels():
    sh = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(sh)], check=True)
    text = sh.read_text()
    assert "pytest -q -m cuda" in text and "benchmarks.gpu_check" in text
    assert "transformer-lens==3.9.*" in text and "sae-lens==6.54.*" in text
    assert ".wheels/" in (ROOT / ".gitignore").read_text().split()


def test_gpu_check_tiny_on_cpu_writes_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    main(["--device", "cpu", "--tiny", "--out", str(out), "--budget-s", "60"])
    r = json.loads(out.read_text())
    assert r["environment"]["device"] == "cpu" and r["tiny"]
    assert set(r["parts"]) == {"train_step", "harvest", "crossover", "nccl"}
    for name, part in r["parts"].items():
        assert "error" not in part, (name, part)
    rows = r["parts"]["train_step"]["rows"]
    assert {row["batch"] for row in rows} == {16, 64} and all(row["ms_per_step"] > 0 for row in rows)
    h = r["parts"]["harvest"]
    assert h["store_path_model_acts"]["tokens_per_s"] > 0 and h["stream_window_on_device"]["tokens_per_s"] > 0
    c = r["parts"]["crossover"]
    assert all(row["dense_ms"] > 0 and row["sparse_ms"] > 0 for row in c["rows"])
    assert "measured_crossover" in c and c["assumed_crossover"] == pytest.approx(1 / 32)
    assert r["parts"]["nccl"]["skipped"].startswith("needs 2 GPUs")


def test_a_failing_part_is_recorded_not_fatal(tmp_path, monkeypatch):
    import benchmarks.gpu_check as gc

    def boom(*a):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(gc, "crossover", boom)
    r = main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "g.json"), "--only", "crossover", "nccl"])
    assert "out of memory" in r["parts"]["crossover"]["error"] and "nccl" in r["parts"]
