"""Planted-feature generator: its ground truth is what it claims to be."""

import torch

from crosscoders.synthetic import PlantedFeatures, SyntheticConfig, match_features


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
