"""Zero-disk streaming: the shuffle buffer draws every kept token of the window once, the batches are the
snapshots' real activations, a killed run resumes to an uninterrupted run's weights."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crosscoders.config import CrosscoderConfig, TrainConfig
from crosscoders.harvest import keep_mask, model_acts
from crosscoders.model import Crosscoder
from crosscoders.stream import ShuffleStream, StreamError, measure_stream_scales
from crosscoders.train import train

HOOK = "blocks.0.hook_resid_post"


def tiny(seed: int) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=12, d_head=8, n_heads=2, d_mlp=32, d_vocab=40,
                                  act_fn="gelu", normalization_type="LN", seed=seed)
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def models():
    return [tiny(s) for s in range(3)]


@pytest.fixture(scope="module")
def tokens():
    t = torch.randint(1, 40, (24, 12), generator=torch.Generator().manual_seed(0))
    t[:, 0] = 0
    return t


def test_a_window_is_every_kept_token_once_shuffled_across_sequences(models, tokens):
    s = ShuffleStream(models, tokens, HOOK, batch_size=11, buffer_seqs=6, seed=1)
    keep = keep_mask(tokens)
    ref = torch.stack([model_acts(m, tokens, [HOOK])[HOOK][keep] for m in models], 1)  # [rows, 3, 16]
    n = s._plan(0)[1][0]  # batches in window 0: 6 seqs x 11 kept tokens = 66 rows = 6 batches of 11
    assert n == 6
    got = torch.cat(list(s._window_batches(0, 0, 0)))
    # the batches are the window's 66 kept tokens (their activations in all three snapshots), each once
    seqs_w = s._plan(0)[0][:6].sort().values
    want = ref.view(24, 11, 3, 16)[seqs_w].reshape(66, 3, 16)
    r = torch.randn(48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    key = lambda x: x.flatten(1).double() @ r  # noqa: E731 (a row's key; equal only for equal rows)
    torch.testing.assert_close(got[key(got).argsort()], want[key(want).argsort()], rtol=0, atol=1e-5)
    match = torch.cdist(got.flatten(1), ref.flatten(1)).argmin(1)
    seqs = (match // 11).tolist()  # 11 kept tokens per sequence
    assert len(set(seqs[:11])) >= 4  # the first batch mixes several sequences (unshuffled it would hold one)
    assert s.position(7) == {**s.position(7), "epoch": 0, "window": 1, "batch_in_window": 1}
    assert s.position(4 * 6)["epoch"] == 1  # 24 seqs = 4 windows of 6 per epoch


def test_scales_and_data_shards(models, tokens):
    sc, d_in = measure_stream_scales(models, tokens, HOOK, 6)
    x = torch.stack([model_acts(m, tokens[:6], [HOOK])[HOOK][keep_mask(tokens[:6])] for m in models], 1)
    torch.testing.assert_close(sc, 4.0 / x.norm(dim=-1).mean(0))  # sqrt(16) / E|x_s|
    assert d_in == 16
    both = ShuffleStream(models, tokens, HOOK, 5, buffer_seqs=3, data_size=2, data_ranks=[0, 1], scales=sc)
    r0 = ShuffleStream(models, tokens, HOOK, 5, buffer_seqs=3, data_size=2, data_ranks=[0], scales=sc)
    r1 = ShuffleStream(models[1:], tokens, HOOK, 5, buffer_seqs=3, data_size=2, data_ranks=[1], scales=sc[1:])
    b, b0, b1 = next(both(3)), next(r0(3)), next(r1(3))
    assert b.shape == (10, 3, 16)
    torch.testing.assert_close(b[:5], b0)  # rank 0's rows, every source
    torch.testing.assert_close(b[5:, 1:], b1)  # rank 1's rows, its sources only
    with pytest.raises(StreamError, match="cannot fill one window"):
        ShuffleStream(models, tokens, HOOK, 5, buffer_seqs=13, data_size=2)
    with pytest.raises(StreamError, match="fewer than batch_size"):
        ShuffleStream(models, tokens, HOOK, 40, buffer_seqs=3)


class Killed(Exception):
    pass


class _KilledAfter:
    """The stream, dying when training asks for batch n (as a killed process would)."""

    def __init__(self, stream, n):
        self.stream, self.n = stream, n
        self.position, self.check_position = stream.position, stream.check_position

    def __call__(self, start):
        for i, x in enumerate(self.stream(start)):
            if start + i == self.n:
                raise Killed
            yield x


def test_killed_stream_run_resumes_to_the_same_weights(models, tokens, tmp_path):
    sc, d_in = measure_stream_scales(models, tokens, HOOK, 6)
    cfg = TrainConfig(steps=14, batch_size=11, lr=3e-3, checkpoint_every=4, progress=False,
                      crosscoder=CrosscoderConfig(n_sources=3, d_in=16, d_sae=24, activation="relu"))
    stream = ShuffleStream(models, tokens, HOOK, 11, buffer_seqs=6, seed=2, scales=sc)
    whole = train(cfg, stream, tmp_path / "whole", norm_scale=sc)
    with pytest.raises(Killed):  # killed at step 10: the checkpoint of step 8 survives
        train(cfg, _KilledAfter(stream, 10), tmp_path / "cut", norm_scale=sc)
    state = torch.load(tmp_path / "cut/checkpoint/state.pt", weights_only=True)
    assert state["step"] == 8 and state["data_position"] == {**stream.position(8), "window": 1,
                                                             "batch_in_window": 2, "sequences_consumed": 6}
    resumed = train(cfg, ShuffleStream(models, tokens, HOOK, 11, buffer_seqs=6, seed=2, scales=sc),
                    tmp_path / "cut", norm_scale=sc)
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert (whole.W_dec - Crosscoder(whole.cfg).W_dec / sc[:, None, None]).abs().max() > 1e-3  # it trained
    # a resume on another stream (other buffer) is refused, not silently continued
    with pytest.raises(Killed):
        train(cfg, _KilledAfter(stream, 10), tmp_path / "cut2", norm_scale=sc)
    with pytest.raises(StreamError, match="token-stream position"):
        train(cfg, ShuffleStream(models, tokens, HOOK, 11, buffer_seqs=4, seed=2, scales=sc), tmp_path / "cut2")


def test_stream_benchmark_quick(tmp_path):
    from benchmarks.stream_bench import main

    r = main(["--quick", "true", "--name", "s", "--results-dir", str(tmp_path)])
    assert (tmp_path / "s.json").exists() and r["steps"] == 4 and set(r["seconds"]) == {
        "bare_forward", "train_memory", "train_stream"}
    assert 0 < r["ratio"] < float("inf")  # a measurement, not a bound: 10.3 once with another job on the CPU
