"""The memory model (evolution/memory.py): counted from the loss itself, checked at a second shape and against the
dry run at Pythia-160M's width; recipes that cannot fit are refused before any model runs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosscoders.config import CrosscoderConfig
from crosscoders.errors import UserError
from crosscoders.losses import crosscoder_loss
from crosscoders.model import Crosscoder
from evolution.memory import check_fits, saved_tensors, stage_memory
from evolution.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "runs"
SCHEMES = [("relu", "shared", "auto"), ("relu", "per_source", "auto"), ("jumprelu", "shared", "auto"),
           ("jumprelu", "per_source", "tanh_quad"), ("jumprelu", "per_source", "tanh_joint"),
           ("batchtopk", "shared", "auto")]


def _saved_activation_bytes(activation, gate, sparsity, B, S, d, H) -> int:
    """Bytes the loss saves for backward at [B, S, d] -> H, parameters excluded (they exist anyway)."""
    torch.manual_seed(1)
    m = Crosscoder(CrosscoderConfig(n_sources=S, d_in=d, d_sae=H, activation=activation, gate=gate, k=8))
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        crosscoder_loss(m, torch.randn(B, S, d), 0.1, sparsity=sparsity, sparse=False)
    return sum(seen.values())


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(s))
def test_saved_tensor_count_predicts_another_shape(scheme):
    """The counts come from one proxy shape; at another (code-dominated) shape they predict the saved bytes."""
    B, S, d, H = 64, 6, 12, 1536
    n = saved_tensors(*scheme)
    predicted = 4 * (n["code"] * B * S * H + n["bh"] * B * H + n["x"] * B * S * d + n["w"] * S * d * H
                     + (n["sh"] * S + n["h"]) * H)
    measured = _saved_activation_bytes(*scheme, B, S, d, H)
    assert predicted == pytest.approx(measured, rel=0.1), (n, predicted, measured)


def test_per_source_jumprelu_tanh_quad_keeps_three_code_tensors(monkeypatch):
    """Issue 22 finding 5: the plan counted four [batch, n_sources, d_sae] tensors with the backward's, the loss
    kept five (three since the fused JumpReLU node) plus the backward's two, so Ge et al.'s stream recipe does not
    fit one 80 GB GPU: refused before any model runs, with the figure and the knob."""
    assert saved_tensors("jumprelu", "per_source", "tanh_quad")["code"] == 3
    assert saved_tensors("batchtopk", "shared", "auto")["code"] == 0
    cfg = load_recipe(RUNS / "pythia-160m-ge2025-stream.toml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU of 80 GiB
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"crosscoder stage needs about \d\d\.\d GiB on cuda.*\[train\] batch_size"):
        check_fits(cfg, ["crosscoder"], available=lambda dev: 80 << 30)


def test_a_stage_that_cannot_fit_is_refused_with_its_figure_and_knob():
    cfg = load_recipe(ROOT / "tests" / "data" / "tiny.toml")
    need = check_fits(cfg, ["harvest", "crosscoder", "analyze"], available=lambda dev: 64 << 30)
    assert set(need) >= {"harvest", "crosscoder", "analyze", "evaluate", "geometry"}
    big = dataclasses.replace(cfg, analyze=dataclasses.replace(cfg.analyze, probe_max_seqs=10**6))
    small_host = lambda dev: int(stage_memory(cfg)["analyze"] * 1.5)  # noqa: E731
    check_fits(cfg, ["analyze"], available=small_host)
    with pytest.raises(UserError, match=r"analyze stage needs .* lower \[analyze\] probe_max_seqs"):
        check_fits(dataclasses.replace(big, corpus=dataclasses.replace(cfg.corpus, n_eval_seqs=10**5)), ["analyze"],
                   available=small_host)


def test_run_study_refuses_a_missing_device_before_anything_runs(tmp_path, monkeypatch):
    from evolution.pipeline import run_study

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_recipe(ROOT / "tests" / "data" / "tiny.toml", root=str(tmp_path))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cuda"))
    with pytest.raises(UserError, match="crosscoder stage's device: device 'cuda' but this machine has no usable CUDA GPU"):
        run_study(cfg)
    assert not (tmp_path / "tiny" / "stages.json").exists()


@pytest.mark.slow
def test_full_width_dry_run_every_stage_within_the_plan(tmp_path):
    """Issue 22 item 1: Pythia-160M's architecture (random weights, an offline hub cache of 8 step{N} revisions),
    blocks.6 at d_sae 24,576 with per-source JumpReLU, every stage in its own process; each stage's peak memory
    above an idle process within 20% of `stage_memory`. Prints the stage table."""
    text = (RUNS / "pythia-160m-dryrun.toml").read_text()
    text = text.replace('cache_dir = "runs/.hub-standin"', f'cache_dir = "{tmp_path / "hub"}"')
    recipe = tmp_path / "pythia-160m-dryrun.toml"
    recipe.write_text(f'root = "{tmp_path / "runs"}"\n' + text)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "benchmarks.dryrun", "--recipe", str(recipe), "--results-dir",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads((tmp_path / "dryrun.json").read_text())
    from benchmarks.dryrun import format_table

    print("\n" + format_table(out), file=sys.stderr)
    assert out["all_ok"], out
    names = [r["stage"] for r in out["stages"]]
    assert names == ["corpus", "harvest", "crosscoder", "analyze", "geometry", "evaluate", "interventions", "phases",
                     "report"]
    for r in out["stages"]:
        if "predicted_GiB" in r:  # peak RSS above an idle process against stage_memory, within 20%
            assert 0.8 <= r["ratio"] <= 1.2, r
