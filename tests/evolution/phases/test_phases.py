"""Phase boundary: each signal on planted curves, and the combination recovering a planted boundary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from crosscoders.io import append_jsonl, write_json
from evolution.phases.stage import change_point, combine, interior_peak, loss_crossing, phases

STEPS = [0] + [2**i for i in range(10)] + [1000, 2000, 4000, 8000, 16000, 32000]
H_UNI, H_BI = 5.0, 3.0
N_LAYERS = 3


def _bump(s: int, centre: int, width: float = 0.6) -> float:
    return math.exp(-(((math.log10(max(s, 1)) - math.log10(centre)) / width) ** 2))


def _planted_run(tmp_path, boundary=1000, lin_peak=2000, turning_point=30000, with_analysis=True):
    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    write_json(run / "corpus" / "meta.json", {"config": {}, "mechanism_names": None, "unigram_entropy": H_UNI,
                                              "bigram_entropy": H_BI, "mechanism_references": None})
    for s in range(0, STEPS[-1] + 1, 250):
        append_jsonl(run / "pretrain" / "log.jsonl", {"step": s, "lr": 1e-3, "train_loss": 7 - math.log10(1 + s), "tokens_seen": s})
    for s in STEPS:
        # eval loss falls through the bigram entropy exactly at log10(1 + s) = log10(boundary)
        loss = H_BI + 0.8 * (math.log10(boundary) - math.log10(1 + s))
        append_jsonl(run / "pretrain" / "log.jsonl", {"step": s, "eval_loss": loss})
    rows = {"linearity": [], "linearity_no_residual": [], "anisotropy": [], "id_twonn": [], "id_mle": []}
    for s in STEPS:
        layers = range(N_LAYERS + 1)
        rows["id_twonn"].append([8 + 20 * _bump(s, boundary) + layer for layer in layers])
        rows["id_mle"].append([7 + 18 * _bump(s, boundary) + layer for layer in layers])
        rows["linearity"].append([0.95 + 0.01 * layer for layer in range(N_LAYERS)] + [None])
        rows["linearity_no_residual"].append([0.3 + 0.4 * _bump(s, lin_peak) for _ in range(N_LAYERS)] + [None])
        rows["anisotropy"].append([0.05 + (0.3 if s >= boundary else 0.0) + 0.01 * layer for layer in layers])
    write_json(run / "geometry.json", {"steps": STEPS, "layers": list(range(N_LAYERS + 1)), "metrics": rows})
    if with_analysis:
        write_json(run / "analysis" / "summary.json",
                   {"turning_point": {"step": turning_point, "used": True}, "steps": STEPS})
        peaks = np.random.default_rng(0).choice(STEPS[8:], size=200)
        (run / "analysis" / "features.csv").write_text(
            "feature,peak_index,peak_step,emergence_step,fade_step,max_norm,group\n"
            + "".join(f"{i},0,{p},0,,1.0,a\n" for i, p in enumerate(peaks))
        )
    return run


def test_planted_boundary_is_recovered(tmp_path):
    run = _planted_run(tmp_path)
    result = phases(run)
    sig = result["signals"]
    assert sig["loss_below_bigram"]["step"] == 1000
    assert sig["id_peak"]["step"] == 1000
    assert sig["linearity_no_residual_peak"]["step"] == 2000
    assert sig["anisotropy_change"]["step"] == 1000
    assert sig["crosscoder_turning_point"]["step"] == 30000
    # none of these signals carries a bootstrap CI: nothing is used, the verdict is inconclusive
    assert result["verdict"] == "inconclusive" and result["boundary_step"] is None
    assert all(not s["used"] for s in sig.values())
    assert "no CI" in sig["id_peak"]["reason"] and "no signal is usable" in result["explanation"]
    on_disk = json.loads((run / "phases.json").read_text())
    assert on_disk["verdict"] == "inconclusive" and set(on_disk["signals"]) == set(sig)
    assert (run / "figures" / "phase_map.png").stat().st_size > 10_000


@pytest.mark.parametrize("boundary", [64, 4000])
def test_boundary_moves_with_the_plant(tmp_path, boundary):
    run = _planted_run(tmp_path, boundary=boundary, lin_peak=boundary, turning_point=boundary, with_analysis=True)
    result = phases(run)
    assert result["verdict"] == "inconclusive"  # no CIs in this planted run
    steps = {k: s["step"] for k, s in result["signals"].items()}
    assert steps["loss_below_bigram"] == steps["id_peak"] == steps["anisotropy_change"] == boundary, steps


def test_without_geometry_or_analysis_only_the_loss_speaks(tmp_path):
    run = _planted_run(tmp_path, with_analysis=False)
    (run / "geometry.json").unlink()
    result = phases(run)
    assert set(result["signals"]) == {"loss_below_bigram"} and result["signals"]["loss_below_bigram"]["step"] == 1000
    assert (run / "figures" / "phase_map.png").exists()


def test_signal_functions():
    assert loss_crossing([0, 10, 20], [5.0, 3.5, 2.9], 3.0)["step"] == 20
    never = loss_crossing([0, 10], [5.0, 4.0], 3.0)
    assert never["step"] is None and not never["used"] and "never" in never["reason"]
    edge = interior_peak([0, 1, 2, 4], [1, 2, 3, 4])  # still rising: no peak to speak of
    assert edge["step"] == 4 and not edge["used"]
    assert interior_peak([0, 1, 2, 4], [1, 5, 3, 2])["step"] == 1
    cp = change_point([1, 2, 4, 8, 16, 32], [0.1, 0.12, 0.1, 0.5, 0.52, 0.5])
    assert cp["step"] == 8 and cp["before"] == pytest.approx(0.1067, abs=1e-3)
    assert combine({})["boundary_step"] is None
    # geometric median: signals at 100, 1000, 10000 -> 1000; an unused one does not count
    out = combine({"a": {"step": 100, "used": True}, "b": {"step": 1000, "used": True},
                   "c": {"step": 10000, "used": True}, "d": {"step": 5, "used": False}})
    assert out["boundary_step"] == 1000 and out["agreement"]["agree"] == ["b"]
