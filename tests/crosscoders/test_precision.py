"""Precision by measurement: "auto" follows the measured bf16/fp32 ratio; explicit bf16 warns where slow."""

import warnings

import pytest
import torch

from crosscoders import precision as P


@pytest.fixture(autouse=True)
def measured(monkeypatch):
    """These tests are about the probe: without the suite's fp32 pin (tests/conftest.py)."""
    monkeypatch.delenv(P.AUTO_ENV, raising=False)


def test_the_pin_overrides_the_probe(monkeypatch):
    monkeypatch.setattr(P, "bf16_speedup", lambda device="cpu": 3.5)
    monkeypatch.setenv(P.AUTO_ENV, "fp32")
    assert P.resolve_autocast("auto", "cpu") == "none" and P.resolve_autocast("bf16", "cpu") == "bf16"
    assert P.describe("auto", "none")["pinned_by"] == f"{P.AUTO_ENV}=fp32"
    monkeypatch.setenv(P.AUTO_ENV, "bf16")
    assert P.resolve_autocast("auto", "cpu") == "bf16"
    monkeypatch.setenv(P.AUTO_ENV, "fp16")
    with pytest.raises(ValueError, match="fp32 or bf16"):
        P.resolve_autocast("auto", "cpu")


def test_probe_measures_a_positive_ratio_and_is_cached():
    r = P.bf16_speedup("cpu")
    assert r > 0 and P.bf16_speedup("cpu") == r


@pytest.mark.parametrize("speedup, expected", [(0.003, "none"), (0.9, "none"), (1.1, "none"), (3.5, "bf16")])
def test_auto_follows_the_measurement(monkeypatch, speedup, expected):
    monkeypatch.setattr(P, "bf16_speedup", lambda device="cpu": speedup)
    assert P.resolve_autocast("auto", "cpu") == expected
    assert P.resolve_autocast("none", "cpu") == "none"


def test_explicit_bf16_warns_with_the_ratio_where_slow(monkeypatch):
    monkeypatch.setattr(P, "bf16_speedup", lambda device="cpu": 1 / 300)
    with pytest.warns(UserWarning, match="300× slower"):
        assert P.resolve_autocast("bf16", "cpu") == "bf16"
    monkeypatch.setattr(P, "bf16_speedup", lambda device="cpu": 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.resolve_autocast("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="autocast"):
        P.resolve_autocast("fp8", "cpu")


def test_this_machine_agrees_with_its_cpu_flags():
    """Independent check of the probe: a CPU without AMX / AVX-512-BF16 emulates bf16 and must get fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        pytest.skip("this CPU has bf16 units; the probe decides")
    assert P.resolve_autocast("auto", "cpu") == "none"


def test_training_records_what_auto_chose(tmp_path):
    import json

    from crosscoders.config import CrosscoderConfig, TrainConfig
    from crosscoders.train import train

    cfg = TrainConfig(crosscoder=CrosscoderConfig(n_sources=2, d_in=8, d_sae=16, k=2), steps=2, batch_size=16,
                      progress=False)
    train(cfg, lambda start: (torch.randn(16, 2, 8) for _ in range(10)), tmp_path)
    rec = json.loads((tmp_path / "precision.json").read_text())
    assert rec["autocast"] == "auto" and rec["precision"] in ("fp32", "bf16") and rec["bf16_speedup_measured"] > 0
