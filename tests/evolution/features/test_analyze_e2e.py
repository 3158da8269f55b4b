"""The tiny end-to-end run carries the new statistics: type columns, hierarchy, turning point with CI, verdict."""

from __future__ import annotations

import json

import evolution


def test_tiny_run_has_types_hierarchy_and_verdict(tiny_run):
    _, run_dir, _ = tiny_run
    run = evolution.load_run(run_dir)
    assert {"type", "type_onset_step", "type_score_induction"} <= set(run.features.columns)
    assert set(run.features["type"]) <= {"inactive", "none", "previous_token", "induction", "current_token", "context"}
    assert (run_dir / "analysis" / "type_scores.safetensors").exists()
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    assert "hierarchy" in summary and "ci" in summary["turning_point"]
    run.hierarchy(by="mechanism")  # a frame (possibly empty on this tiny run)
    ph = run.phases
    assert ph["verdict"] in ("boundary", "inconclusive") and "explanation" in ph
    assert (ph["boundary_step"] is None) == (ph["verdict"] == "inconclusive")
    html = (run_dir / "report.html").read_text()
    assert "phase boundary" in html and "learning hierarchy" in html.lower()
