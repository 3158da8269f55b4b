"""Type scores on planted activations where the answer is known: each planted kind gets its type,
noise features clear no null, never-active features get NaN and "inactive"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evolution.features.types import (
    TypeConfig,
    assign_types,
    induction_type_stats,
    stream_type_stats,
    type_onset,
)

V, N_SEQ, T = 40, 96, 32
KINDS = ["current_token"] * 8 + ["previous_token"] * 8 + ["context"] * 8 + ["induction"] * 8 + ["noise"] * 16 + ["dead"] * 4


def planted(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (N_SEQ, T), generator=g)
    tokens[:, 0] = 0
    prev = torch.cat([tokens[:, :1], tokens[:, :-1]], 1)
    d = len(KINDS)
    acts = torch.zeros(N_SEQ, T, d)
    torch.randint(1, V, (64, 12), generator=g)
    rep = torch.zeros(64, 11, d)
    ctrl = torch.zeros(64, 11, d)
    for i, kind in enumerate(KINDS):
        w = torch.rand(V, generator=g) * (torch.rand(V, generator=g) < 0.3)
        noise = 0.05 * torch.rand(N_SEQ, T, generator=g)
        if kind == "current_token":
            acts[..., i] = w[tokens] + noise * (w[tokens] > 0)
        elif kind == "previous_token":
            acts[..., i] = w[prev] + noise * (w[prev] > 0)
        elif kind == "context":
            level = torch.rand(N_SEQ, 1, generator=g) * (torch.rand(N_SEQ, 1, generator=g) < 0.4)
            acts[..., i] = level * (0.8 + 0.4 * torch.rand(N_SEQ, T, generator=g))
        elif kind == "noise":
            acts[..., i] = torch.relu(torch.randn(N_SEQ, T, generator=g) - 1)
        if kind == "induction":  # fires on the repeated half only
            rep[..., i] = 1 + 0.2 * torch.rand(64, 11, generator=g)
            ctrl[..., i] = 0.1 * torch.rand(64, 11, generator=g) * (torch.rand(64, 11, generator=g) < 0.2)
        elif kind != "dead":  # same behaviour on any random tokens
            x = torch.relu(torch.randn(128, 11, generator=g) - 1)
            rep[..., i], ctrl[..., i] = x[:64], x[64:]
    keep = torch.ones(N_SEQ, T, dtype=torch.bool)
    keep[:, 0] = False
    return tokens, acts, keep, rep, ctrl


def test_planted_types_are_recovered_and_noise_is_untyped():
    tokens, acts, keep, rep, ctrl = planted()
    cfg = TypeConfig()
    stats = stream_type_stats(acts, tokens, keep, cfg)
    stats["induction"] = induction_type_stats(rep, ctrl, cfg)
    types = assign_types(stats, cfg)
    kinds = np.array(KINDS)
    types = np.array(types)
    for kind in ("current_token", "previous_token", "context", "induction"):
        hit = (types[kinds == kind] == kind).mean()
        print(kind, hit, types[kinds == kind])
        assert hit >= 0.85, (kind, types[kinds == kind])
    assert (types[kinds == "noise"] == "none").mean() >= 0.9, types[kinds == "noise"]
    assert (types[kinds == "dead"] == "inactive").all()
    for t in ("current_token", "previous_token", "context", "induction"):
        s = stats[t]["score"]
        assert torch.isnan(s[kinds == "dead"]).all()  # never active: no score, never 1.0
        finite = s[~torch.isnan(s)]
        assert ((finite >= 0) & (finite <= 1)).all()
        assert s[kinds == "noise"].nan_to_num(0).median() < 0.05  # noise: ~0 above chance


def test_null_is_calibrated_on_pure_noise():
    """Every feature is noise: the share typed is the false-positive rate of the stated level."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, V, (N_SEQ, T), generator=g)
    acts = torch.relu(torch.randn(N_SEQ, T, 200, generator=g) - 0.5)
    keep = torch.ones(N_SEQ, T, dtype=torch.bool)
    keep[:, 0] = False
    stats = stream_type_stats(acts, tokens, keep)
    stats["induction"] = induction_type_stats(torch.rand(64, 11, 200, generator=g), torch.rand(64, 11, 200, generator=g))
    typed = np.mean([t != "none" for t in assign_types(stats)])
    z = torch.cat([stats[t]["z"] for t in stats])
    print(f"false-positive rate {typed:.3f}, z mean {z.mean():.2f} sd {z.std():.2f}")
    assert typed <= 0.05


def test_type_onset():
    types = np.array([["none", "previous_token", "previous_token", "previous_token"],
                      ["none", "none", "induction", "none"],
                      ["inactive"] * 4, ["none"] * 4], dtype=object)
    final, onset = type_onset(types, [0, 10, 100, 1000])
    assert final == ["previous_token", "induction", "inactive", "none"]
    assert onset == [10, 100, None, None]


def test_type_onset_counts_only_snapshots_where_the_feature_is_present():
    """Shared gate: the type is the same in every snapshot; presence (norm ≥ half max) dates it."""
    types = np.array([["induction"] * 4, ["context"] * 4, ["previous_token"] * 4], dtype=object)
    present = np.array([[False, False, True, True], [True, False, True, True], [False] * 4])
    final, onset = type_onset(types, [0, 10, 100, 1000], present)
    assert final == ["induction", "context", "previous_token"]
    assert onset == [100, 100, None]
    with pytest.raises(ValueError, match="shape"):
        type_onset(types, [0, 10, 100, 1000], present[:, :2])


def test_type_timeline_in_column_blocks_equals_all_latents_at_once():
    """A dictionary too wide for [tokens, d_sae] at once is typed block by block: same scores, z and types."""
    from handbuilt import HOOK, handbuilt_model, random_stream, subspace_crosscoder, subspace_directions

    from evolution.features.type_probe import type_timeline

    V, N = 12, 48
    W, _ = subspace_directions(V, N)
    cc = subspace_crosscoder(W, torch.rand(W.shape[1], 2, generator=torch.Generator().manual_seed(0)))
    snaps = [(10, handbuilt_model(V, N, induction_head=False)), (100, handbuilt_model(V, N))]
    tokens = random_stream(n_seq=16, vocab=V)
    whole = type_timeline(cc, snaps, tokens, HOOK, [10, 100], bos_token_id=0, induction_seqs=8)
    blocks = type_timeline(cc, snaps, tokens, HOOK, [10, 100], bos_token_id=0, induction_seqs=8,
                           max_elements=5 * 16 * 40)  # a few latents per block
    assert cc.cfg.d_sae > 3 * 5  # several blocks, one of them short
    for t in whole["score"]:
        # float64 sums over another width: equal to ~1e-16
        torch.testing.assert_close(blocks["score"][t], whole["score"][t], rtol=0, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(blocks["z"][t], whole["z"][t], rtol=1e-9, atol=1e-9, equal_nan=True)
    assert (blocks["types"] == whole["types"]).all() and (whole["types"] != "inactive").any()
