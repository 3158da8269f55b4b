"""Timelines against planted decoders: peak index, emergence/fade, groups, the turning point."""

from __future__ import annotations

import numpy as np
import torch

from evolution.features.timelines import (
    GROUPS,
    TimelineConfig,
    Timelines,
    compute_timelines_from_W_dec,
    pairwise_cos,
)

STEPS = [0, 2, 8, 32, 128, 256, 512, 1000, 2000, 3000, 5000, 8000, 12000, 20000, 40000, 80000]


def planted_decoder(d_sae=300, d_in=48, turn_at=8, seed=0, noise=0.05):
    """W_dec with a planted norm profile per feature (a bump, a rise, a fall) and directions that switch
    from one random direction to another at snapshot `turn_at` (the planted turning point)."""
    g = torch.Generator().manual_seed(seed)
    n = len(STEPS)
    s = torch.arange(n, dtype=torch.float)
    profiles = []
    for _ in range(d_sae):
        kind = torch.randint(3, (1,), generator=g).item()
        if kind == 0:  # bump at a random snapshot
            p = torch.randint(n, (1,), generator=g).item()
            w = 0.8 + 2.5 * torch.rand(1, generator=g).item()
            prof = torch.exp(-0.5 * ((s - p) / w) ** 2)
        elif kind == 1:  # rises at a random snapshot and keeps growing slowly (peak at the end)
            e = torch.randint(1, n - 1, (1,), generator=g).item()
            prof = torch.sigmoid(2 * (s - e)) * (1 + 0.02 * s)
        else:  # present from the start, fades at a random snapshot
            f = torch.randint(2, n, (1,), generator=g).item()
            prof = torch.sigmoid(-2 * (s - f)) * (1 - 0.02 * s)
        profiles.append(prof * (0.5 + torch.rand(1, generator=g).item()))
    profiles = torch.stack(profiles)  # [d_sae, n]
    pre = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=-1)
    post = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=-1)
    dirs = torch.stack([pre if i < turn_at else post for i in range(n)])
    dirs = torch.nn.functional.normalize(dirs + noise * torch.randn(dirs.shape, generator=g) / d_in**0.5, dim=-1)
    W_dec = dirs * profiles.T[:, :, None]
    return W_dec, profiles


def test_peak_index_matches_planted_and_reference():
    W_dec, profiles = planted_decoder()
    tl = compute_timelines_from_W_dec(W_dec, STEPS)
    ref_norms = np.linalg.norm(W_dec.numpy(), axis=-1).T
    np.testing.assert_allclose(tl.norms.numpy(), ref_norms, rtol=1e-5, atol=1e-6)
    planted_peak = profiles.argmax(1)
    alive = ~tl.dead
    agree = (tl.peak_index[alive] == planted_peak[alive]).float().mean().item()
    assert agree >= 0.9, agree
    assert alive.float().mean() > 0.95
    assert tl.peak_step == [STEPS[i] for i in planted_peak.tolist()]


def test_turning_point_found_where_planted():
    for turn_at in (5, 8, 12):
        W_dec, _ = planted_decoder(turn_at=turn_at, seed=turn_at)
        tl = compute_timelines_from_W_dec(W_dec, STEPS)
        assert tl.steps[tl.turning_index] == STEPS[turn_at] and tl.turning["used"]
        assert STEPS[turn_at - 1] < tl.turning_point_step <= STEPS[turn_at]  # the one step every output shows
        assert tl.turn_agreement > 0.6
        # cosine to the final direction is ~1 after the turn and ~0 before it
        m = tl.mean_cos_to_final
        assert m[turn_at:].min() > 0.9 and m[: turn_at].abs().max() < 0.3


def test_emergence_fade_and_groups_on_hand_profiles():
    n = len(STEPS)
    prof = torch.zeros(5, n)
    prof[0] = 1.0                                   # persistent
    prof[1, 10:] = torch.linspace(0.6, 1.0, n - 10)  # late-rising, emerges at 10
    prof[2, :6] = torch.tensor([0.4, 0.8, 1.0, 0.9, 0.6, 0.45])  # early-and-fading, fades at 4 -> 5
    prof[3, 7:10] = torch.tensor([0.55, 1.0, 0.7])  # transient-middle: emerges 7, peaks 8, fades at 10
    prof[4] = 1e-9                                  # dead
    prof[0, 3] = 1.01                               # unique peak for the persistent one
    d = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    W_dec = prof.T[:, :, None] * d[None]
    tl = compute_timelines_from_W_dec(W_dec, STEPS, TimelineConfig(threshold=0.5))
    assert tl.groups == ["persistent", "late-rising", "early-and-fading", "transient-middle", "dead"]
    assert set(tl.groups) <= set(GROUPS)
    assert tl.emergence_index.tolist() == [0, 10, 1, 7, -1]
    assert tl.fade_index.tolist() == [-1, -1, 5, 10, -1]
    assert tl.peak_index[:4].tolist() == [3, n - 1, 2, 8]
    df = tl.to_frame()
    assert df["fade_step"].isna().tolist() == [True, True, False, False, True]
    assert int(df.loc[3, "emergence_step"]) == STEPS[7] and int(df.loc[2, "fade_step"]) == STEPS[5]
    assert df.loc[4, "dead"] and tl.rel_norms[4].abs().max() == 0


def test_pairwise_cos_against_loop_reference_and_chunking():
    W_dec, _ = planted_decoder(d_sae=20, seed=3)
    feats = [0, 5, 19]
    pc = pairwise_cos(W_dec, feats, chunk=2)
    for k, f in enumerate(feats):
        for s in range(len(STEPS)):
            for t in range(len(STEPS)):
                a, b = W_dec[s, f].double(), W_dec[t, f].double()
                ref = (a @ b / (a.norm() * b.norm())).float()
                assert abs(pc[k, s, t] - ref) < 1e-5
    full = pairwise_cos(W_dec, chunk=7)
    assert full.shape == (20, len(STEPS), len(STEPS))
    torch.testing.assert_close(full[feats], pc)
    tl = compute_timelines_from_W_dec(W_dec, STEPS)
    torch.testing.assert_close(full[:, :, -1], tl.cos_to_final)


def test_save_load_roundtrip(tmp_path):
    W_dec, _ = planted_decoder(d_sae=30, seed=1)
    tl = compute_timelines_from_W_dec(W_dec, STEPS, TimelineConfig(threshold=0.4))
    tl.save(tmp_path / "timelines.safetensors")
    back = Timelines.load(tmp_path / "timelines.safetensors")
    assert back.steps == STEPS and back.groups == tl.groups and back.turning_index == tl.turning_index
    assert back.cfg.threshold == 0.4
    torch.testing.assert_close(back.norms, tl.norms)
    assert back.to_frame().equals(tl.to_frame())
    s = tl.summary()
    assert s["turning_point_step"] == tl.turning_point_step and s["steps"] == STEPS
    assert sum(s["group_counts"].values()) == 30


def test_emergence_is_the_rising_edge_of_the_run_holding_the_peak():
    """A feature present at initialisation that dips in the statistical phase and forms again emerges where it
    forms again; one present throughout is `present_from_start` (left-censored, no rising edge observed)."""
    n = len(STEPS)
    prof = torch.full((3, n), 0.8)
    prof[0, 3:7] = 0.1                 # init, dip at 3..6, back at 7, peaks at the end
    prof[0, -1] = 1.0
    prof[1, 5] = 1.0                   # present from init up to its peak: present_from_start
    prof[2, :] = 0.05
    prof[2, 9:] = 1.0                  # never present before 9
    prof[2, 12] = 1.2
    d = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    tl = compute_timelines_from_W_dec(prof.T[:, :, None] * d[None], STEPS, TimelineConfig(threshold=0.5))
    assert tl.emergence_index.tolist() == [7, 0, 9]
    assert tl.to_frame()["present_from_start"].tolist() == [False, True, False]
    first = compute_timelines_from_W_dec(prof.T[:, :, None] * d[None], STEPS, TimelineConfig(emergence="first"))
    assert first.emergence_index.tolist() == [0, 0, 9]  # DESIGN.md's original rule, kept as an option


def test_timelines_read_norms_in_training_units_without_rescaling_W_dec():
    """A saved crosscoder has each source's scale folded into W_dec; the timelines undo it for the norms only
    (cosines do not depend on a positive per-source factor), so W_dec is never copied."""
    import torch

    from crosscoders.config import CrosscoderConfig
    from crosscoders.model import Crosscoder
    from evolution.features.timelines import compute_timelines, compute_timelines_from_W_dec

    torch.manual_seed(0)
    cc = Crosscoder(CrosscoderConfig(n_sources=5, d_in=6, d_sae=40))
    with torch.no_grad():
        cc.W_dec.mul_(torch.rand(5, 40, 1) + 0.1)
        cc.norm_scale.copy_(torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25]))
    steps = [0, 1, 2, 3, 4]
    got = compute_timelines(cc, steps)
    ref = compute_timelines_from_W_dec(cc.W_dec.detach() * cc.norm_scale.reshape(-1, 1, 1), steps)
    torch.testing.assert_close(got.norms, ref.norms)
    torch.testing.assert_close(got.cos_to_final, ref.cos_to_final)
    torch.testing.assert_close(got.turn, ref.turn)
    assert torch.equal(got.peak_index, ref.peak_index)
    assert got.W_dec.data_ptr() == cc.W_dec.data_ptr()  # the crosscoder's own tensor, not a copy
