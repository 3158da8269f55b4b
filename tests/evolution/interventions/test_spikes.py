"""Loss-spike detection on synthetic curves with planted spikes, and ID around them."""

from __future__ import annotations

import numpy as np

from evolution.interventions.spikes import SpikeConfig, detect_spikes, spike_geometry


def _curve(n=3000, seed=0, noise=0.02):
    g = np.random.default_rng(seed)
    steps = np.arange(1, n + 1)
    return steps, 2.0 + 4.0 * np.exp(-steps / 400) + noise * g.normal(size=n)


def test_planted_spikes_are_found_and_noise_is_not():
    steps, loss = _curve()
    assert detect_spikes(steps, loss) == []  # a falling, noisy curve has none
    planted = {800: 0.5, 1500: 0.3, 2400: 0.8}
    for at, h in planted.items():  # a jump decaying over ~4 steps
        loss[at - 1 : at + 5] += h * np.exp(-np.arange(6) / 1.5)
    spikes = detect_spikes(steps, loss)
    assert [s["peak"] for s in spikes] == list(planted)
    for s, h in zip(spikes, planted.values(), strict=True):
        assert abs(s["height"] - h) < 0.1 and s["start"] <= s["peak"] <= s["end"] <= s["start"] + 6


def test_threshold_follows_the_noise():
    steps, loss = _curve(noise=0.2, seed=1)
    loss[999] += 0.5  # 2.5σ: not a spike at k = 6
    assert detect_spikes(steps, loss) == []
    assert 1000 in [s["peak"] for s in detect_spikes(steps, loss, SpikeConfig(k=2.0))]


def test_id_around_spikes():
    geo = {"steps": [0, 100, 200, 400], "metrics": {"id_twonn": [[1, 2], [3, 4], [5, 6], [7, 9]],
                                                     "id_mle": [[1, 1], [2, 2], [3, 3], [4, 4]]}}
    out = spike_geometry([{"start": 150, "peak": 151, "end": 160, "height": 1.0}], geo)[0]
    assert out["snapshot_before"] == 100 and out["snapshot_after"] == 200
    assert out["id_twonn_before"] == [3, 4] and out["id_twonn_change"] == [2, 2]
