"""`feature-evolution <verb>`: dispatch, one-stage re-runs, and clear one-line errors."""

from __future__ import annotations

import pytest

from evolution.cli import main


def test_stage_verb_redoes_only_that_stage(tiny_run, capsys):
    _, run, _ = tiny_run
    before = (run / "report.html").stat().st_mtime_ns
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "[report] running" in err and "[crosscoder] up to date" in err
    assert (run / "report.html").stat().st_mtime_ns > before
    assert f"{run}/report.html" in err  # it says where the result went


def test_stage_verb_on_a_copied_run_directory_works_on_the_copy(tiny_run, capsys, tmp_path):
    """run.json names the run it was written for; a stage verb on a copy (another name, another place) must
    work on the copy, not re-run the study into the directory run.json names."""
    import shutil

    _, run, _ = tiny_run
    copy = tmp_path / "renamed-copy"
    shutil.copytree(run, copy)
    assert main(["report", str(copy)]) == 0
    err = capsys.readouterr().err
    assert "[corpus] up to date" in err and "[report] running" in err and f"{copy}/report.html" in err


def test_offline_hub_recipe_and_bad_target_fail_with_a_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "runs/pythia-160m-ge2025.toml", "--name", "x"]) == 2
    assert "needs the Hugging Face hub" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    capsys.readouterr()
    assert main(["analyze", str(tmp_path)]) == 2  # a directory without run.json is refused in one line
    err = capsys.readouterr().err
    assert "not a run directory" in err and "Traceback" not in err


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nno_such_key = 1\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and len(err.strip().splitlines()) == 2  # the message and the --debug hint
    with pytest.raises(ValueError, match="no_such_key"):
        main(["run", str(bad), "--debug"])
    monkeypatch.setenv("FEATURE_EVOLUTION_DEBUG", "1")
    with pytest.raises(ValueError, match="no_such_key"):
        main(["run", str(bad)])


def test_train_module_reports_a_corrupted_store_without_a_traceback(tmp_path):
    import subprocess
    import sys

    import torch

    from crosscoders.store_writer import StoreWriter

    store = tmp_path / "store"
    w = StoreWriter(store, ["a", "b"], "blocks.0.hook_resid_post", 8, dtype="float32")
    w.add(torch.randn(64, 2, 8), torch.zeros(64, dtype=torch.long), torch.arange(64))
    w.finish()
    shard = next(store.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-16])
    r = subprocess.run([sys.executable, "-m", "crosscoders.train", "--store", str(store), "--out", str(tmp_path / "o"),
                        "--steps", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and shard.name in r.stderr, r.stderr


@pytest.mark.parametrize("stage, fields", [("crosscoder", ["--lr", "--steps", "--d-sae", "--activation", "--gate"]),
                                           ("evaluate", ["--batch-size", "--n-seqs", "--alpha"])])
def test_stage_help_lists_that_stages_config_fields(stage, fields, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f in out for f in fields), out


def test_stage_flags_run_that_stage_and_are_recorded(tiny_run, capsys, tmp_path):
    """The documented `feature-evolution evaluate RUN --batch-size 8`: the stage with that field, in run.json."""
    import json
    import shutil

    _, run, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["evaluate", str(copy), "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "[evaluate] running" in err and "[analyze]" not in err  # only the stage and what it reads from
    assert json.loads((copy / "run.json").read_text())["evaluate"]["batch_size"] == 8
    assert main(["evaluate", str(copy), "--batch-size", "eight"]) == 2  # a bad value: one line
    assert "expects int" in capsys.readouterr().err
