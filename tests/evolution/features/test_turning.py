"""Turning point: one planted drift sampled on two schedules gives the same turning step (issue: the
turning point is a property of the model, not of the schedule); edge check; null; fraction turning."""

from __future__ import annotations

import numpy as np
import torch

from evolution.features.turning import log_steps, turning_point

PYTHIA_LIKE = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] + list(range(1000, 10001, 1000)) + [14000, 20000, 27000, 34000]
UNIFORM = list(range(0, 34001, 250))
T0 = 3000  # planted: directions turn fastest (per log-step) at step 3000


def planted_drift(steps, t0=T0, d_sae=200, d_in=32, width=0.25, angle=1.4, noise=0.03, seed=0):
    """Each feature's direction rotates in its own random plane by angle(t) = angle * sigmoid((log t − log t0)
    / width): a drift that is a function of the training step alone, sampled at `steps`."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=-1)
    v = torch.randn(d_sae, d_in, generator=g)
    v = torch.nn.functional.normalize(v - (v * u).sum(-1, keepdim=True) * u, dim=-1)
    x = torch.tensor(log_steps(steps), dtype=torch.float)
    phi = angle * torch.sigmoid((x - np.log10(t0 + 1)) / width)  # [n]
    W = torch.cos(phi)[:, None, None] * u + torch.sin(phi)[:, None, None] * v  # [n, d_sae, d_in]
    W = torch.nn.functional.normalize(W + noise * torch.randn(W.shape, generator=g) / d_in**0.5, dim=-1)
    cos = torch.einsum("sfd,fd->fs", W, W[-1])
    rel = torch.ones(d_sae, len(steps))
    return cos, rel, torch.zeros(d_sae, dtype=torch.bool)


def _old_rule(cos, steps):
    """The rule this replaces: the snapshot interval with the largest mean direction change (not per log-step)."""
    ang = torch.arccos(cos.clamp(-1, 1)).mean(0).numpy()
    return steps[int(np.argmax(-np.diff(ang))) + 1]


def test_same_turning_step_on_two_schedules():
    res = {}
    for name, steps in (("pythia", PYTHIA_LIKE), ("uniform", UNIFORM)):
        tp = turning_point(*planted_drift(steps), steps)
        res[name] = tp
        assert tp["used"], tp
        lo, hi = tp["ci"]
        assert lo <= T0 * 1.5 and hi >= T0 / 1.5, tp
        assert tp["fraction"] > 0.8 and tp["fraction_ci"][0] > 0.7
    a, b = res["pythia"]["step"], res["uniform"]["step"]
    print(f"turning step: Pythia-like schedule {a}, uniform schedule {b} (planted {T0}); "
          f"old rule {_old_rule(planted_drift(PYTHIA_LIKE)[0], PYTHIA_LIKE)} vs {_old_rule(planted_drift(UNIFORM)[0], UNIFORM)}")
    # within one interval of the coarser schedule there (Pythia-like: every 1000), and of the plant
    ia, ib, it = (int(np.searchsorted(PYTHIA_LIKE, v)) for v in (a, b, T0))
    assert abs(ia - ib) <= 1 and abs(ia - it) <= 1 and abs(ib - it) <= 1, (a, b)


def test_uniform_drift_has_no_turning_point():
    """A drift uniform in log-step has no turning point. The old rule still names one, the interval that
    is widest in log-step (512 -> 1000 on this schedule, as on Pythia's): the schedule's artefact."""
    cos, rel, dead = planted_drift(PYTHIA_LIKE, width=100.0, angle=150.0)  # sigmoid ~ linear in log-step
    assert _old_rule(cos, PYTHIA_LIKE) in (1, 1000)
    tp = turning_point(cos, rel, dead, PYTHIA_LIKE)
    assert not tp["used"] and "no peak" in tp["reason"], tp
    tp = turning_point(*planted_drift(PYTHIA_LIKE, t0=20), PYTHIA_LIKE)  # an early turn is found early
    assert 10 <= tp["step"] <= 40 and tp["used"], tp


def test_edge_and_null():
    # a turn in the last interval is not seen from both sides
    steps = PYTHIA_LIKE
    tp = turning_point(*planted_drift(steps, t0=33000, width=0.02), steps)
    assert not tp["used"] and "first or last" in tp["reason"]
    # no drift at all: angles to the final direction are noise around a constant
    g = torch.Generator().manual_seed(1)
    cos = torch.cos(0.3 + 0.1 * torch.randn(200, len(steps), generator=g))
    tp = turning_point(cos, torch.ones_like(cos), torch.zeros(200, dtype=torch.bool), steps)
    assert not tp["used"] and "noise" in tp["reason"], tp
    assert tp["fraction"] < 0.5  # per-feature turns of 0.1 rad noise: the population rule is what counts


def _drift_with_reference(steps, phi_of_step, d_sae=200, d_in=32, seed=0):
    """cos to the final direction and to the direction `reference_drop` (2) snapshots before it, for a
    rotation by phi(step) in each feature's own plane."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=-1)
    v = torch.randn(d_sae, d_in, generator=g)
    v = torch.nn.functional.normalize(v - (v * u).sum(-1, keepdim=True) * u, dim=-1)
    phi = torch.tensor([phi_of_step(s) for s in steps], dtype=torch.float)
    W = torch.cos(phi)[:, None, None] * u + torch.sin(phi)[:, None, None] * v
    return (torch.einsum("sfd,fd->fs", W, W[-1]), torch.ones(d_sae, len(steps)), torch.zeros(d_sae, dtype=torch.bool),
            torch.einsum("sfd,fd->fs", W, W[-3]))


def test_a_drift_lasting_to_the_end_is_not_a_turning_point():
    """Directions that rotate steadily per step until the last snapshot: measured against the final direction, the
    angle falls fastest per log-step just before the end, wherever the schedule ends (the demo's 2,524 moved to
    2,314 and 2,103 as its last snapshots were dropped). The reference check rejects it; a planted mid-run turn
    on the same schedule passes it."""
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128, 250] + list(range(500, 3001, 250))
    cos, rel, dead, ref = _drift_with_reference(steps, lambda t: 1.2 * t / 3000)
    naive = turning_point(cos, rel, dead, steps, cos_to_earlier=None)
    assert naive["used"] and naive["step"] > 2000, naive  # without the check: a "turning point" near the end
    tp = turning_point(cos, rel, dead, steps, cos_to_earlier=ref)
    assert not tp["used"] and "last 3 snapshot intervals" in tp["reason"], tp
    mid = _drift_with_reference(steps, lambda t: 1.4 / (1 + np.exp(-(np.log10(t + 1) - np.log10(129)) / 0.1)))
    tp = turning_point(*mid[:3], steps, cos_to_earlier=mid[3])
    assert tp["used"] and tp["reference_check"]["checkable"] and not tp["reference_check"]["moved"], tp
    assert 64 <= tp["step"] <= 250
