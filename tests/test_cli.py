"""`feature-evolution <verb>`: dispatch, one-stage re-runs, and clear one-line errors."""

from __future__ import annotations

from evolution.cli import main


def test_stage_verb_redoes_only_that_stage(tiny_run, capsys):
    _, run, _ = tiny_run
    before = (run / "report.html").stat().st_mtime_ns
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "[report] running" in err and "[crosscoder] up to date" in err
    assert (run / "report.html").stat().st_mtime_ns > before
    assert f"{run}/report.html" in err  # it says where the result went


def test_offline_hub_recipe_and_bad_target_fail_with_a_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "runs/pythia-160m-ge2025.toml", "--name", "x"]) == 1
    assert "needs the Hugging Face hub" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    try:
        main(["analyze", str(tmp_path)])
    except SystemExit as e:
        assert "neither a recipe" in str(e)
    else:
        raise AssertionError("a directory without run.json must be refused")
