"""Phase signals with CIs on planted per-token / per-feature data, and the verdict rule: a boundary when
two signals agree within their CIs, "inconclusive" when they do not."""

from __future__ import annotations

import numpy as np

from evolution.phases.signals import combine_with_ci, crossing, interior_min, rising_onset

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000, 4000]


def planted_loss(cross_at=9, n_tok=2000, seed=0):
    """d[token, s] = model NLL − bigram NLL, falling through 0 at snapshot `cross_at`."""
    rng = np.random.default_rng(seed)
    mean = 0.4 * (cross_at - 0.5 - np.arange(len(STEPS)))
    return mean[None] + rng.normal(0, 1.0, (n_tok, len(STEPS)))


def planted_kl(min_at=9, n_tok=2000, seed=1):
    rng = np.random.default_rng(seed)
    mean = 0.5 + 0.08 * (np.arange(len(STEPS)) - min_at) ** 2
    return mean[None] + rng.gamma(2.0, 0.5, (n_tok, len(STEPS))) - 1.0


def planted_alive(onset=9, d=400, seed=2):
    rng = np.random.default_rng(seed)
    born = np.clip(np.round(rng.normal(onset, 1.0, d)), 1, len(STEPS) - 1)
    return np.arange(len(STEPS))[None] >= born[:, None]


def test_each_signal_recovers_its_plant():
    c = crossing(planted_loss(), STEPS)
    assert c["used"] and c["step"] == STEPS[9] and c["ci"][0] <= STEPS[9] <= c["ci"][1]
    m = interior_min(planted_kl(), STEPS)
    assert m["used"] and m["step"] == STEPS[9] and m["effect_ci"][0] > 0
    a = rising_onset(planted_alive(), STEPS)
    assert a["used"] and abs(STEPS.index(a["step"]) - 9) <= 1


def test_signals_that_do_not_beat_their_null_are_not_used():
    flat = np.random.default_rng(0).normal(0, 1, (500, len(STEPS))) + 1.0
    assert not interior_min(flat, STEPS)["used"]
    assert not crossing(flat + 5, STEPS)["used"]
    assert "first snapshot" in rising_onset(np.ones((50, len(STEPS)), bool), STEPS)["reason"]
    edge = interior_min(planted_kl(min_at=len(STEPS) - 1), STEPS)
    assert not edge["used"] and "edge" in edge["reason"]


def test_agreeing_signals_publish_a_boundary():
    sig = {"loss": crossing(planted_loss(9), STEPS), "kl": interior_min(planted_kl(9), STEPS),
           "alive": rising_onset(planted_alive(9), STEPS)}
    out = combine_with_ci(sig)
    assert out["verdict"] == "boundary" and len(out["agree"]) >= 2
    assert abs(STEPS.index(min(STEPS, key=lambda s: abs(s - out["boundary_step"]))) - 9) <= 1


def test_disagreeing_signals_are_inconclusive():
    """The loss crosses at step 8, KL bottoms out at 1000, features appear at 4000: no two CIs meet."""
    sig = {"loss": crossing(planted_loss(4), STEPS), "kl": interior_min(planted_kl(11), STEPS),
           "alive": rising_onset(planted_alive(14, seed=3), STEPS),
           "stray": {"step": 64, "used": True}}  # no CI: not used
    out = combine_with_ci(sig)
    assert out["verdict"] == "inconclusive" and out["boundary_step"] is None, out
    assert "agree within their CIs" in out["explanation"] and out["spread"]["min_step"] == 8
    assert not sig["stray"]["used"] and "no CI" in sig["stray"]["reason"]


def test_alive_onset_is_the_rising_edge_after_the_statistical_phase_trough():
    """Init features alive at step 0 die by snapshot 5, new ones are born around 10: the onset is the rise
    after the trough (not "alive from the first snapshot"), and the decline is reported."""
    rng = np.random.default_rng(4)
    n = len(STEPS)
    init = np.arange(n)[None] < np.clip(np.round(rng.normal(4, 0.7, 300)), 1, n)[:, None]
    born = planted_alive(onset=10, d=300, seed=5)
    a = rising_onset(np.concatenate([init, born]), STEPS)
    assert a["used"] and abs(STEPS.index(a["step"]) - 10) <= 1, a
    assert a["decline"]["first"] == 300 and a["decline"]["trough_step"] in STEPS[4:10]
    assert a["ci"][0] <= a["step"] <= a["ci"][1]
    # the same init features with nothing born after: no onset, with the reason
    none = rising_onset(init, STEPS)
    assert not none["used"] and "first snapshot" in none["reason"]
