"""Estimates that are not in-sample: held-out linearity, the few-tokens warning, and geometry signals with
CIs from token resamples (planted curves where the answer is known)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from evolution.geometry.layer_metrics import linearity_heldout, linearity_pair, linearity_score
from evolution.phases.signals import resample_ci
from evolution.phases.stage import change_point, interior_peak


def test_noise_overfits_in_sample_but_not_held_out():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 60
    X, Y = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert linearity_score(X, Y) > 0.1  # ≈ d/n from overfitting alone
    assert linearity_heldout(X, Y) < 0.02
    pair = linearity_pair(X, Y)
    assert pair["linearity"] > 0.1 and pair["linearity_heldout"] < 0.02 and pair["linearity_no_residual_heldout"] < 0.55


def test_exact_affine_map_scores_one_on_both():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 20, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(20, 20, generator=g, dtype=torch.float64) + 3.0
    assert linearity_score(X, Y) == pytest.approx(1.0, abs=1e-9)
    assert linearity_heldout(X, Y) == pytest.approx(1.0, abs=1e-9)
    assert linearity_heldout(X, Y, residual=False) == pytest.approx(1.0, abs=1e-9)
    pair = linearity_pair(X, Y)
    assert pair["linearity_heldout"] == pytest.approx(1.0, abs=1e-9)
    assert pair["linearity_no_residual_heldout"] == pytest.approx(1.0, abs=1e-9)


def test_geometry_warns_below_ten_tokens_per_dimension():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from evolution.geometry.stage import GeometryConfig, model_geometry

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=16, d_head=8, d_vocab=50, act_fn="gelu"))
    tokens = torch.randint(1, 50, (20, 16))
    with pytest.warns(UserWarning, match="10 × d_model"):
        out = model_geometry(model, tokens, GeometryConfig(n_tokens=100, mle_k1=3, mle_k2=5, n_resamples=2))
    assert len(out["metrics"]["resamples"]["id_twonn"]) == 2  # [resample][layer]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_geometry(model, tokens, GeometryConfig(n_tokens=1000, mle_k1=3, mle_k2=5, n_resamples=0))


STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_resampled_geometry_signals_are_used_only_when_they_beat_noise():
    rng = np.random.default_rng(0)
    bump = np.exp(-((np.arange(len(STEPS)) - 5) ** 2) / 3.0)
    curves = bump[None] + rng.normal(0, 0.05, (10, len(STEPS)))
    full = bump + rng.normal(0, 0.02, len(STEPS))
    sig = resample_ci(interior_peak(STEPS, full), STEPS, curves, "peak")
    assert sig["used"] and sig["step"] == 16 and sig["ci"][0] <= 16 <= sig["ci"][1] and sig["frac_resamples_agree"] == 1
    noise = rng.normal(0, 1.0, (10, len(STEPS)))
    flat = resample_ci(interior_peak(STEPS, noise.mean(0) + [0, 0, 0, 0, 0, 0.3, 0, 0, 0, 0]), STEPS, noise, "peak")
    assert not flat["used"] and "resamples" in flat["reason"]
    step_curve = (np.arange(len(STEPS)) >= 6).astype(float)
    ch = resample_ci(change_point(STEPS, step_curve), STEPS, step_curve[None] + rng.normal(0, 0.05, (10, len(STEPS))), "change")
    assert ch["used"] and ch["step"] == 32 and ch["ci"] == [32, 32]
