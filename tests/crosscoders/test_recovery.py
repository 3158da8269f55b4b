"""Acceptance: a crosscoder trained with the *defaults* of CrosscoderConfig / TrainConfig recovers planted
features on hard data (`hard_config`: drift, a sharp turn, rise/peak/fade profiles with a 20% peak margin,
per-snapshot magnitudes, anisotropic noise, an offset, superposition), judged per snapshot: a feature is
recovered when one latent's decoder cosine is >= 0.9 in every snapshot where it is alive, and its peak is
exact when argmax_s |W_dec[s, i]| of that latent is the planted peak (DESIGN.md's definition).

The bars (issue 11): >= 95% recovered, >= 90% of those with the exact peak. Defaults that pass them: relu with
the code times the L2 decoder norm over sources (`sparsity = "l1_l2"`, the relu default; the sum of norms
lets a feature split over snapshots at no cost, exact peak 0.60-0.66), jumprelu with tanh coefficient 4 and
the pre-activation loss 0.01 reviving dead latents (coefficient 10 without it: 0.80 recovered), and for the
per-source gate the penalty `tanh_joint`, one tanh term per latent of its output summed over sources (jumprelu's
default; recovered 0.97-1.00, exact peak 0.97-1.00 over seeds 0-2 x both shapes). With OpenMOSS's per-source
mean of tanh terms a latent open in k of S snapshots pays k / S, as much as k single-snapshot latents, and
features split by snapshot (one latent for a faint birth snapshot, another for the rest): 0.72-0.93
recovered; a gate warm-up (the gate's norm annealed from the largest over sources to each source's own over
the first 30% of steps) gave only 0.81-0.94. What a test sets is the same for
every scheme: the shape (d_sae = 4 x n_features), batch 256, lr 3e-3 for a short run, and batchtopk's k =
1.5 x the expected number of active features per token (k is the L0 the user asks for, not a coefficient).
batchtopk passes with the nested top-k term (`nested_k_frac` 0.25, `nested_k_coef` 1, its default): that k is
1.5 x the planted L0, and without the term the slack slots (0.42 of 1.62 latents per token at S6xD16 seed 0)
went to latents that merge two features (one latent firing for either of two features, precision 0.47) and
to latents correcting them, the degenerate solutions Chanin & Garriga-Alonso 2025 (*Sparse but Wrong*, arXiv
2508.16560) find in BatchTopK SAEs whose L0 is too high; the reconstruction from the top k / 4 alone charges
them (figures with it in TrainConfig.nested_k_frac). Measured without the term (recovered, seeds 0/1/2):
k = 1.5 x L0: S8xD32 0.93/0.89/0.90, S6xD16 0.83/0.89/0.81; k = 1.2 x: S6xD16 0.94/0.97/1.00; k = 1.0 x: S8xD32
0.99/1.00/0.99, S6xD16 0.92/1.00/1.00; 5000 steps at 1.5 x: S6xD16 0.92/0.89/1.00. Changes that did not reach
the bar at 1.5 x (S6xD16): AuxK 1/32-1 with k_aux 16-64, earlier LR decay, selection on the L2 decoder norm over
sources 0.81/0.86/0.81, unit-norm decoders with the parallel gradient removed (Gao et al. 2024; Bussmann et al.
2024) 0.89/0.86/0.89, encoding x - b_dec (Gao et al. 2024) 0.92/0.89/0.83, no gradient clipping 0.83/-/0.83,
Adam beta2 0.99 0.86/-/0.86.
Print the table with `pytest -m slow -s tests/crosscoders/test_recovery.py`. Also: per-snapshot activations of a trained
crosscoder against the planted per-snapshot magnitudes.
"""

import pytest
import torch

from crosscoders.config import CrosscoderConfig, TrainConfig
from crosscoders.model import activations_per_snapshot
from crosscoders.synthetic import PlantedFeatures, hard_config, per_snapshot_match, recovery_report
from crosscoders.train import train

SCHEMES = [("relu", "shared"), ("relu", "per_source"), ("jumprelu", "shared"), ("jumprelu", "per_source"),
           ("batchtopk", "shared")]
SHAPES = {"S8xD32": (8, 32), "S6xD16": (6, 16)}
# Schemes measured below the bar are marked here, not hidden (issue 11); today every scheme passes the bars at
# every seed and shape.
OPEN: dict[tuple[str, str], str] = {}


def train_on_planted(activation, gate, tmp_path, S=8, D=32, seed=0, steps=2000):
    truth = PlantedFeatures(hard_config(S, D, seed=seed))
    scale = truth.norm_scale()
    F, p = truth.cfg.n_features, truth.cfg.p_active
    cc = CrosscoderConfig(n_sources=S, d_in=D, d_sae=4 * F, activation=activation, gate=gate, k=1.5 * F * p,
                          seed=seed)
    cfg = TrainConfig(crosscoder=cc, steps=steps, batch_size=256, lr=3e-3, dead_tokens=256 * 50,
                      log_every=100, checkpoint_every=10**9, progress=False)
    model = train(cfg, truth.batch_source(256, scale), tmp_path, norm_scale=scale)
    return model, truth


def report(activation, gate, tmp_path, **kw):
    model, truth = train_on_planted(activation, gate, tmp_path, **kw)
    rep = recovery_report(model, truth)
    print(f"\n{activation:9s} {gate:10s} {kw}: recovered {rep['frac_recovered']:.2f}, exact peak "
          f"{rep['frac_peak_correct']:.2f}, peak within 1 {rep['frac_peak_within_1']:.2f}")
    return rep


def marked(scheme):
    reason = OPEN.get(scheme)
    return pytest.param(*scheme, marks=pytest.mark.xfail(reason=reason, strict=False) if reason else ())


@pytest.mark.parametrize("activation,gate", [marked(s) for s in SCHEMES])
def test_recovers_planted_features_fast(tmp_path, activation, gate):
    rep = report(activation, gate, tmp_path, S=4, D=16, steps=600)
    assert rep["frac_recovered"] >= 0.95
    assert rep["frac_peak_correct"] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("activation,gate", [marked(s) for s in SCHEMES])
def test_recovery_bars(tmp_path, activation, gate, seed, shape):
    S, D = SHAPES[shape]
    rep = report(activation, gate, tmp_path, S=S, D=D, seed=seed)
    assert rep["frac_recovered"] >= 0.95
    assert rep["frac_peak_correct"] >= 0.9


@pytest.mark.parametrize("gate", ["shared", "per_source"])
def test_per_snapshot_activations_follow_planted_magnitudes(tmp_path, gate):
    # activations_per_snapshot of a trained crosscoder (raw activations, scales folded in) against the planted
    # norm a_i profile[i, s] (* its lognormal factor) that feature i writes into source s, token by token:
    # the correlation over tokens in each snapshot where the feature is alive, for each recovered feature.
    # Per snapshot, because the per-source code f[s, i] = pre_i H(pre_i n_s - theta_i) carries no decoder
    # norm: its level across snapshots is not the profile (that is in |W_dec[s, i]|), its token pattern is.
    model, truth = train_on_planted("jumprelu", gate, tmp_path, S=4, D=16, steps=400)
    cos, idx, _ = per_snapshot_match(model.W_dec, truth)
    x, mags = truth.sample_with_magnitudes(4096, torch.Generator().manual_seed(123))
    acts = activations_per_snapshot(model, x)  # [n, S, d_sae]
    corrs = []
    for i in (cos >= 0.9).nonzero().squeeze(1).tolist():
        for s in truth.alive[i].nonzero().squeeze(1).tolist():
            corrs.append(torch.corrcoef(torch.stack([acts[:, s, idx[i]], mags[:, s, i]]))[0, 1].item())
    corrs = torch.tensor(corrs).nan_to_num(0.0)
    print(f"\n{gate}: {len(corrs)} (feature, snapshot) pairs, correlation median {corrs.median():.3f}, "
          f"10th percentile {corrs.quantile(0.1):.3f}")
    assert (cos >= 0.9).float().mean() >= 0.8
    assert corrs.median() >= 0.9 and (corrs >= 0.9).float().mean() >= 0.8


def test_per_source_gate_stays_closed_where_a_feature_is_dead(tmp_path):
    # Ge et al.'s per-source gate is why per-snapshot activations mean something: on the tokens of a recovered
    # feature its latent fires in the snapshots where the feature is alive and not where it is dead (profile 0).
    # jumprelu's default penalty (tanh_joint) charges a latent about once however many sources it is open in, so
    # this checks that it did not buy recovery by opening gates everywhere.
    model, truth = train_on_planted("jumprelu", "per_source", tmp_path, S=4, D=16, steps=400)
    cos, idx, _ = per_snapshot_match(model.W_dec, truth)
    x, mags = truth.sample_with_magnitudes(4096, torch.Generator().manual_seed(7))
    acts = activations_per_snapshot(model, x)  # [n, S, d_sae]
    alive_rate, dead_rate = [], []
    for i in (cos >= 0.9).nonzero().squeeze(1).tolist():
        fires = (acts[mags[:, :, i].amax(1) > 0][:, :, idx[i]] > 0).float().mean(0)  # [S], on feature i's tokens
        alive_rate += fires[truth.alive[i]].tolist()
        dead_rate += fires[truth.profiles[i] == 0].tolist()
    alive_rate, dead_rate = torch.tensor(alive_rate), torch.tensor(dead_rate)
    print(f"\nper-source gate on a recovered feature's tokens: fires in {alive_rate.mean():.2f} of alive and "
          f"{dead_rate.mean():.3f} of dead (feature, snapshot) pairs ({len(alive_rate)} / {len(dead_rate)})")
    assert len(dead_rate) > 0 and alive_rate.mean() >= 0.8 and dead_rate.mean() <= 0.05
