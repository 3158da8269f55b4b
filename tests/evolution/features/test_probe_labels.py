"""Ground-truth mechanism labels of features on a stream: which mechanism a feature helps predict (gt_type,
purity) and whether it reads more than its current token (the token-matched lift)."""

from __future__ import annotations

import pytest
import torch
from handbuilt import BOS, random_stream

from evolution.features.probes import stream_scores


def test_ground_truth_type_from_labels():
    """Labels = token % 4. Feature 0 fires when the *next* token has label 2 (a feature at t helps predict
    t+1): gt_type = MECHANISMS[2], purity 1. Feature 1 fires on current label 1: gt_type_current. Feature 2
    fires everywhere: purity = the most common label's base rate."""
    toks = random_stream(50, 30, 40, seed=4)
    labels = toks % 4
    labels[:, 0] = -1

    def fn(tokens):
        nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], 1)
        return torch.stack([((nxt % 4) == 2).float(), ((tokens % 4) == 1).float(), torch.ones(tokens.shape)], -1)

    out, _ = stream_scores(fn, toks, labels, bos_token_id=BOS)
    assert out["gt_label"][0] == 2 and out["gt_purity"][0] == pytest.approx(1.0)
    assert out["gt_label_current"][1] == 1 and out["gt_purity_current"][1] == pytest.approx(1.0)
    lab = labels[:, 1:].flatten()
    base = torch.bincount(lab, minlength=4).float() / len(lab)
    assert out["gt_purity_current"][2] == pytest.approx(float(base.max()), abs=1e-6)


def test_token_matched_lift_separates_token_features_from_mechanism_features():
    """Label of t+1 is 2 with probability 0.8 after tokens ≡ 0 (mod 5), 0.1 otherwise. Feature 0 fires on those
    tokens (a current-token feature): high gt_lift, but its token explains it, gt_token_lift = 1. Feature 1 fires
    exactly where label 2 follows (it reads more than its token): gt_token_lift > 1, computed independently below."""
    toks = random_stream(80, 40, 40, seed=5)

    def follows2(tokens):  # label of t+1 is 2: decided by (token t, token t+1), ~0.8 after a trigger, ~0.1 else
        cur, nxt = tokens[:, :-1], tokens[:, 1:]
        hit = torch.where(cur % 5 == 0, nxt % 10 < 8, nxt % 10 == 0)
        return torch.cat([hit, torch.zeros_like(hit[:, :1])], 1)

    nxt_lab = torch.where(follows2(toks), 2, 0)
    labels = torch.cat([torch.full_like(toks[:, :1], -1), nxt_lab[:, :-1]], 1)

    def fn(tokens):
        return torch.stack([((tokens % 5) == 0).float(), follows2(tokens).float()], -1)

    out, _ = stream_scores(fn, toks, labels, bos_token_id=BOS)
    assert out["gt_label"].tolist() == [2, 2]
    base2 = float((labels[:, 1:] == 2).float().mean())
    assert out["gt_purity"][0] / base2 > 2.0  # the plain lift calls the token feature a mechanism feature
    assert out["gt_token_lift"][0] == pytest.approx(1.0, abs=1e-5)
    # reference: q(2 | token) on the kept positions (all but position 0 and the last, whose t+1 has no label)
    keep = torch.zeros_like(toks, dtype=torch.bool)
    keep[:, 1:-1] = True
    keep &= toks != BOS
    q = {int(v): float((nxt_lab[keep & (toks == v)] == 2).float().mean()) for v in toks[keep].unique()}
    on = keep & (nxt_lab == 2)
    expected = sum(q[int(v)] for v in toks[on]) / int(on.sum())
    assert out["gt_token_lift"][1] == pytest.approx(1.0 / expected, rel=1e-4)
    assert out["gt_token_lift"][1] > 1.5
