"""The probes' memory guard: per-snapshot activations hold n_tokens x d_sae floats, checked before any model runs."""

import pytest
import torch

from crosscoders.config import CrosscoderConfig
from crosscoders.errors import UserError
from crosscoders.model import Crosscoder
from evolution.features.snapshot_acts import check_memory, shared_pre_acts


def never_run():
    raise AssertionError("a snapshot model ran although the budget was exceeded")
    yield


def test_shared_pre_acts_refuses_above_the_budget_before_running_a_model():
    cc = Crosscoder(CrosscoderConfig(n_sources=2, d_in=4, d_sae=1000))
    tokens = torch.zeros(10, 100, dtype=torch.long)  # 1000 tokens x 1000 latents x 4 B = 4 MB (+ one set's acts)
    with pytest.raises(UserError, match=r"1,000 tokens x d_sae 1,000 .* probe fewer tokens"):
        shared_pre_acts(cc, never_run(), [tokens], "blocks.0.hook_resid_post", max_bytes=2**20)
    assert check_memory([tokens], 1000, max_bytes=2**24) == 2 * 4 * 1000 * 1000  # pre-acts + the set handed out


def test_the_budget_holds_pythia_160m_probes():
    """Ge et al.'s width under the default 8 GiB: 24,576 latents on 256 x 256 probe tokens and 64 induction rows
    of 65 (the type probe takes its latents in column blocks, so one block is handed out, not all)."""
    from evolution.features.snapshot_acts import HANDOUT_ELEMENTS, MAX_PRE_ACT_BYTES

    sets = [torch.zeros(256, 256, dtype=torch.long), torch.zeros(64, 65, dtype=torch.long)]
    need = check_memory(sets, 24_576)
    assert need == 4 * (24_576 * (65_536 + 4_160) + HANDOUT_ELEMENTS) and need < MAX_PRE_ACT_BYTES
    print(f"Pythia-160M probes: {need / 2**30:.2f} GiB of {MAX_PRE_ACT_BYTES / 2**30:.0f}")


def _one_at_a_time(steps, make):
    """(step, model) pairs that fail as soon as a model is made while the previous one is still alive."""
    import gc
    import weakref

    prev = None
    for s in steps:
        gc.collect()
        assert prev is None or prev() is None, f"step {s} loads while the previous snapshot is still referenced"
        model = make(s)
        prev = weakref.ref(model)
        yield s, model
        del model


def test_the_probes_hold_one_snapshot_at_a_time():
    """Pythia-160M's probes ran with three snapshots alive at once (the first one, the previous one held by the
    progress bar, the one loading): 6.1 GiB above the process where one model and the pre-activations need 3.9."""
    from evolution.features.probes import ProbeConfig, probe_features
    from tests.handbuilt import handbuilt_model, random_stream, subspace_crosscoder, subspace_directions

    V, N = 16, 48
    W, _ = subspace_directions(V, N)
    cc = subspace_crosscoder(W, torch.ones(W.shape[1], 3))
    steps = [0, 1, 2]
    tokens = random_stream(8, vocab=V)
    shared_pre_acts(cc, _one_at_a_time(steps, lambda s: handbuilt_model(V, N)), [tokens], "blocks.1.hook_resid_post",
                    steps)
    probe_features(cc, _one_at_a_time(steps, lambda s: handbuilt_model(V, N)), tokens, "blocks.1.hook_resid_post",
                   steps=steps, cfg=ProbeConfig(top_k=2, max_seqs=8))


def test_the_type_probe_holds_one_snapshot_at_a_time():
    from evolution.features.type_probe import type_timeline
    from tests.handbuilt import handbuilt_model, random_stream, subspace_crosscoder, subspace_directions

    V, N = 16, 48
    W, _ = subspace_directions(V, N)
    cc = subspace_crosscoder(W, torch.ones(W.shape[1], 3))
    type_timeline(cc, _one_at_a_time([0, 1, 2], lambda s: handbuilt_model(V, N)), random_stream(8, vocab=V),
                  "blocks.1.hook_resid_post", [0, 1, 2], induction_len=8, induction_seqs=4)


def test_one_encoding_serves_the_probes_and_the_type_probe():
    """The analyze stage encodes the snapshots once for both probes (their token sets overlap: BOS + R + R is the
    probes' induction set and the type probe's repeat set); each result equals its own separate pass."""
    from evolution.features.probes import ProbeConfig, induction_tokens, probe_features, probe_token_sets
    from evolution.features.snapshot_acts import encode_token_sets
    from evolution.features.type_probe import repeat_and_control, type_timeline, type_token_sets
    from tests.handbuilt import handbuilt_model, random_stream, subspace_crosscoder, subspace_directions

    V, N, hook, steps = 16, 48, "blocks.1.hook_resid_post", [0, 1, 2]
    W, _ = subspace_directions(V, N)
    cc = subspace_crosscoder(W, torch.ones(W.shape[1], 3))
    tokens = random_stream(8, vocab=V)
    bos, pcfg = int(tokens[0, 0]), ProbeConfig(top_k=2, max_seqs=8, induction_len=8, induction_seqs=4)
    vocab = tokens.unique()
    vocab = vocab[vocab != bos]
    assert torch.equal(induction_tokens(vocab, 8, 4, bos), repeat_and_control(vocab, 8, 4, bos)[0])
    loads = []

    def snapshots():
        for s in steps:
            loads.append(s)
            yield s, handbuilt_model(V, N)

    pre = encode_token_sets(cc, snapshots(), lambda n_ctx: probe_token_sets(tokens, n_ctx, pcfg, bos)
                            + type_token_sets(tokens, n_ctx, bos, induction_len=8, induction_seqs=4), hook, steps)
    assert loads == steps and len(pre.token_sets) == 3  # the stream and BOS + R + R once each, and the control
    shared = probe_features(cc, None, tokens, hook, steps=steps, cfg=pcfg, pre_acts=pre)
    alone = probe_features(cc, snapshots(), tokens, hook, steps=steps, cfg=pcfg)
    pd_testing = __import__("pandas").testing
    pd_testing.assert_frame_equal(shared.table, alone.table)
    t_shared = type_timeline(cc, None, tokens, hook, steps, induction_len=8, induction_seqs=4, pre_acts=pre)
    t_alone = type_timeline(cc, snapshots(), tokens, hook, steps, induction_len=8, induction_seqs=4)
    for t in t_alone["score"]:
        torch.testing.assert_close(t_shared["score"][t], t_alone["score"][t], equal_nan=True)
    assert (t_shared["types"] == t_alone["types"]).all()


def test_handed_out_chunks_do_not_keep_every_source_alive(monkeypatch):
    """SnapshotActs.rows computes every source's code per chunk and keeps one source: a view of it kept each
    chunk's whole [rows, n_sources, d_sae] code alive until the concatenation (0.8 GB for one Pythia row)."""
    from evolution.features.snapshot_acts import SnapshotActs

    cc = Crosscoder(CrosscoderConfig(n_sources=3, d_in=4, d_sae=32))
    pre = torch.randn(2, 10, 32)
    seen = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda ts, *a, **k: (seen.extend(ts), real_cat(ts, *a, **k))[1])
    out = SnapshotActs(cc, pre, source=1, max_elements=3 * 32 * 4).rows(0, 2)  # chunks of 4 rows
    assert len(seen) == 5 and all(t.untyped_storage().nbytes() == 4 * t.numel() for t in seen)
    monkeypatch.undo()
    torch.testing.assert_close(out.reshape(-1, 32), cc.activations_from_pre(pre.reshape(-1, 32))[:, 1])
