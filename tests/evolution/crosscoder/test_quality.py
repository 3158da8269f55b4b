"""The crosscoder stage ends with a quality check: a degenerate dictionary warns in the log, is recorded in
eval.json and heads the report, naming the fields to change; dead-latent windows follow the run's length."""

from __future__ import annotations

import json
import shutil

import pytest

from crosscoders.config import TrainConfig
from evolution.cli import main
from evolution.crosscoder.quality import MAX_DEAD_FRAC, DegenerateDictionary, quality_check
from evolution.report.html import build_report


def test_dead_latent_window_follows_the_run_length():
    assert TrainConfig(steps=1000, batch_size=384).dead_tokens_resolved == 19_200  # 5% of the run's 384k tokens
    assert TrainConfig(steps=100_000, batch_size=4096).dead_tokens_resolved == 1_000_000  # capped
    assert TrainConfig(steps=2, batch_size=64).dead_tokens_resolved == 64  # at least one batch
    assert TrainConfig(dead_tokens=123).dead_tokens_resolved == 123  # an explicit window is kept


def test_a_collapsed_dictionary_is_announced(tiny_run, tmp_path, capsys):
    _, run, _ = tiny_run
    copy = tmp_path / "collapsed"
    shutil.copytree(run, copy)
    # an L1 coefficient 1000x the default closes every latent: the dictionary explains nothing
    with pytest.warns(DegenerateDictionary):
        assert main(["crosscoder", str(copy), "--activation", "relu", "--sparsity-coef", "1000"]) == 0
    q = json.loads((copy / "crosscoder" / "eval.json").read_text())["quality"]
    assert q["degenerate"] and len(q["warnings"]) == 2
    assert "never fire" in q["warnings"][0] and "dead_tokens" in q["warnings"][0] and "steps" in q["warnings"][0]
    assert "FVU above" in q["warnings"][1] and "sparsity_coef" in q["warnings"][1]
    assert "degenerate dictionary" in capsys.readouterr().err
    page = build_report(copy).read_text()
    assert page.index("The crosscoder is degenerate") < page.index('<section id="phases">')  # heads the report


def test_a_healthy_dictionary_passes():
    tcfg = TrainConfig()
    ok = {"dead_frac_shared": 0.29, "n_tokens": 16128, "fvu": [0.12, 0.2], "sources": ["step0", "step1"]}
    assert quality_check(ok, tcfg) == {"degenerate": False, "bars": {"max_dead_frac": MAX_DEAD_FRAC, "max_fvu": 0.3},
                                       "warnings": []}
