"""Planted-feature generator: its ground truth is what it claims to be."""

from dataclasses import replace

import pytest
import torch

from crosscoders.synthetic import PlantedFeatures, SyntheticConfig, family_config, match_features


def test_ground_truth_shapes_units_and_peaks():
    t = PlantedFeatures(SyntheticConfig(n_sources=6, d_in=16, n_features=20, seed=0))
    assert t.directions.shape == (6, 20, 16) and t.profiles.shape == (20, 6)
    torch.testing.assert_close(t.directions.norm(dim=-1), torch.ones(6, 20))
    assert torch.equal(t.profiles.argmax(-1), t.peak_index)
    # directions turn gradually: cosine to the first source falls monotonically with the source
    cos0 = (t.directions * t.directions[:1]).sum(-1)  # [S, F]
    assert (cos0[1:] <= cos0[:-1] + 1e-6).all() and (cos0[-1] < 0.99).any()


def test_batches_are_a_function_of_step_and_scale_to_sqrt_d():
    t = PlantedFeatures(SyntheticConfig(n_sources=4, d_in=16, n_features=20, seed=1))
    assert torch.equal(t.batch(7, 32), next(t.batches(32, start_step=7)))
    assert not torch.equal(t.batch(7, 32), t.batch(8, 32))
    scale = t.norm_scale()
    norms = t.batch(123, 4096, scale).norm(dim=-1).mean(0)
    torch.testing.assert_close(norms, torch.full((4,), 4.0), rtol=0.05, atol=0)


def test_data_is_the_sum_of_planted_features():
    cfg = SyntheticConfig(n_sources=3, d_in=8, n_features=5, noise=0.0, p_active=1.0, seed=2)
    t = PlantedFeatures(cfg)
    x = t.sample(4, torch.Generator().manual_seed(0))
    # with every feature active the data lie in the span of the true decoders, source by source
    for s in range(3):
        basis = t.decoders[:, s].T  # [d_in, F]
        coef = torch.linalg.lstsq(basis, x[:, s].T).solution
        torch.testing.assert_close(basis @ coef, x[:, s].T, atol=1e-4, rtol=0)


def test_planted_turning_point():
    cfg = SyntheticConfig(n_sources=8, d_in=32, n_features=50, turn_at=5, turn_frac=0.8, turn_angle=1.2,
                          max_rotation=0.2, seed=3)
    t = PlantedFeatures(cfg)
    step_cos = (t.directions[1:] * t.directions[:-1]).sum(-1)  # [S-1, F]: cos between neighbours
    assert 0.6 < t.turned.float().mean() < 0.95
    # turned features jump between sources 4 and 5 (cos 1.2 rad = 0.36), nowhere else
    torch.testing.assert_close(step_cos[4, t.turned], torch.full((int(t.turned.sum()),), 0.362), atol=0.07, rtol=0)
    assert (step_cos[torch.arange(7) != 4] > 0.99).all() and (step_cos[4, ~t.turned] > 0.99).all()


def test_match_features_finds_the_truth_itself():
    t = PlantedFeatures(SyntheticConfig(n_sources=3, d_in=8, n_features=10, seed=4))
    W_dec = t.decoders.permute(1, 0, 2)[:, torch.randperm(10)]  # a permuted perfect dictionary
    cos, idx = match_features(W_dec, t)
    torch.testing.assert_close(cos, torch.ones(10))
    assert torch.equal(W_dec[:, idx], t.decoders.permute(1, 0, 2))


def test_rise_profiles_persist_and_peak_last_by_the_margin():
    cfg = SyntheticConfig(n_sources=7, d_in=16, n_features=40, profile="rise", peak_margin=0.2, seed=5)
    t = PlantedFeatures(cfg)
    p = t.profiles
    assert (p[:, 1:] >= p[:, :-1]).all()  # monotone: a feature born stays alive and grows
    assert torch.equal(t.peak_index, torch.full((40,), 6)) and torch.equal(p.argmax(-1), t.peak_index)
    assert (p[:, -1] == 1).all() and (p[:, :-1] <= 0.8 + 1e-6).all()
    born = p > 0
    assert (born[:, 1:] >= born[:, :-1]).all() and (p[born] >= cfg.alive_floor - 1e-6).all()
    assert 0 < born.float().mean() < 1  # births differ between features


def test_mixed_profiles_draw_every_kind_with_correct_peaks():
    cfg = SyntheticConfig(n_sources=8, d_in=16, n_features=90, profile="mixed", seed=6)
    t = PlantedFeatures(cfg)
    assert torch.equal(t.profiles.argmax(-1), t.peak_index)
    zero_after = ((t.profiles == 0) & (torch.arange(8) > t.peak_index[:, None])).any(-1)  # rise_fade deaths
    rise = (t.peak_index == 7) & (t.profiles[:, 0] == 0) & (t.profiles[:, 6] <= 0.8 + 1e-6)
    bump = (t.profiles > 0).all(-1)
    assert zero_after.any() and rise.any() and bump.any()
    assert t.alive.any(-1).all()  # every feature is alive somewhere: recovery is judged on each


def test_magnitude_distributions_have_mean_1_5():
    for kind in ["exponential", "uniform", "lognormal", "constant"]:
        cfg = SyntheticConfig(n_sources=2, d_in=8, n_features=4, p_active=1.0, profile_floor=1.0, magnitude=kind)
        _, a = PlantedFeatures(cfg).sample_with_magnitudes(20_000, torch.Generator().manual_seed(0))
        torch.testing.assert_close(a.mean(), torch.tensor(1.5), atol=0.02, rtol=0, msg=kind)
        assert (a > 0).all()


def test_co_active_raises_partner_co_occurrence_and_planted_l0():
    base = SyntheticConfig(n_sources=2, d_in=16, n_features=20, p_active=0.1, seed=7)
    g = torch.Generator
    plain = PlantedFeatures(base)
    paired = PlantedFeatures(replace(base, co_active=0.6))
    assert torch.equal(paired.partner[paired.partner], torch.arange(20)) and (paired.partner != torch.arange(20)).all()
    _, a0 = plain.sample_with_magnitudes(20_000, g().manual_seed(1))
    _, a1 = paired.sample_with_magnitudes(20_000, g().manual_seed(1))
    on0, on1 = a0.amax(1) > 0, a1.amax(1) > 0  # [n, F] active
    both0 = (on0 & on0[:, paired.partner]).float().mean()
    both1 = (on1 & on1[:, paired.partner]).float().mean()
    # a pair both active: p^2 = 0.01 of tokens when independent, about 2 p co = 0.12 when paired
    assert both0 < 0.015 and both1 > 5 * both0
    assert abs(on1.sum(-1).float().mean() - paired.planted_l0) < 0.05 * paired.planted_l0
    assert abs(on0.sum(-1).float().mean() - plain.planted_l0) < 0.05 * plain.planted_l0
    assert plain.planted_l0 == pytest.approx(2.0) and paired.planted_l0 > 3.0


def test_family_draws_cover_the_ranges_and_are_planted_correctly():
    cfgs = [family_config(s) for s in range(12)]
    assert family_config(3) == cfgs[3]  # a pure function of the seed
    S, D = [c.n_sources for c in cfgs], [c.d_in for c in cfgs]
    assert min(S) == 2 and max(S) >= 24 and min(D) <= 20 and max(D) >= 200
    assert all(2 <= s <= 32 and 16 <= d <= 256 for s, d in zip(S, D, strict=True))
    assert {c.profile for c in cfgs} == {"bump", "rise_fade", "rise", "mixed"}
    assert len({c.magnitude for c in cfgs}) >= 3
    assert any(c.co_active > 0 for c in cfgs) and any(c.turn_at is not None for c in cfgs)
    for c in cfgs:
        t = PlantedFeatures(c)
        assert 1.0 <= t.planted_l0 <= 10.0 + 1e-6 and c.n_features <= 3 * c.d_in + 1
        assert torch.equal(t.profiles.argmax(-1), t.peak_index) and t.alive.any(-1).all()
