"""The stream window stays on the snapshots' device (no host round trip) and gives the batches it gave when
it went through the host; harvest and stream on a device equal `run_with_cache` (cuda: under -m cuda)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crosscoders.harvest import harvest, keep_mask, model_acts
from crosscoders.stream import ShuffleStream
from tests.conftest import DEVICES

HOOK = "blocks.0.hook_resid_post"
D_IN = 16


def tiny(seed: int, device="cpu") -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_IN, n_ctx=12, d_head=8, n_heads=2, d_mlp=32, d_vocab=40,
                                  act_fn="gelu", normalization_type="LN", seed=seed)
    return HookedTransformer(cfg).eval().to(device)


def _tokens() -> torch.Tensor:
    t = torch.randint(1, 40, (24, 12), generator=torch.Generator().manual_seed(0))
    t[:, 0] = 0
    return t


def _host_path_batches(s: ShuffleStream, epoch: int, window: int):
    """The window as it was built before (model_acts → host fp32, stack, permute, view): the reference."""
    n = s._plan(epoch)[1][window]
    parts = []
    for d in s.data_ranks:
        order = s._plan(epoch)[0]
        start = (window * s.data_size + d) * s.buffer_seqs
        idx = order[start:start + s.buffer_seqs].sort().values
        x = torch.stack([model_acts(m, s.tokens[idx], [HOOK], s.model_batch)[HOOK][s.keep[idx]] for m in s.models()], 1)
        g = torch.Generator().manual_seed(s._window_seed(epoch, window, d))
        x = x[torch.randperm(len(x), generator=g)[: n * s.batch_size]]
        parts.append(x.view(n, s.batch_size, *x.shape[1:]))
    for b in range(n):
        x = torch.cat([p[b] for p in parts]).float()
        yield x * s.scales[None, :, None] if s.scales is not None else x


def test_window_batches_are_unchanged_and_no_activation_goes_to_the_host(monkeypatch):
    models, tokens, sc = [tiny(s) for s in range(3)], _tokens(), torch.tensor([0.5, 2.0, 1.5])
    s = ShuffleStream(models, tokens, HOOK, 5, buffer_seqs=3, data_size=2, data_ranks=[0, 1], scales=sc,
                      model_batch=2)
    want = [list(_host_path_batches(s, 0, w)) for w in range(2)]
    host = []  # activation rows (>= d_in floats) that crosscoders' code sends to the host in the window path
    cpu, to = torch.Tensor.cpu, torch.Tensor.to

    def ours() -> bool:  # called from crosscoders/ (TransformerLens moves its own tensors to the model's device)
        return f"{os.sep}crosscoders{os.sep}" in sys._getframe(2).f_code.co_filename

    def counted_cpu(self, *a, **k):
        if self.is_floating_point() and self.numel() >= D_IN and ours():
            host.append(("cpu", tuple(self.shape)))
        return cpu(self, *a, **k)

    def counted_to(self, *a, **k):
        target = k.get("device", a[0] if a else None)
        if (self.is_floating_point() and self.numel() >= D_IN and isinstance(target, str | torch.device)
                and torch.device(target).type == "cpu" and ours()):
            host.append(("to", tuple(self.shape)))
        return to(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "cpu", counted_cpu)
    monkeypatch.setattr(torch.Tensor, "to", counted_to)
    got = [list(s._window_batches(0, w, 0)) for w in range(2)]
    monkeypatch.undo()
    assert not host, host[:3]
    assert [len(w) for w in got] == [len(w) for w in want] and len(got[0]) >= 5
    for gw, ww in zip(got, want, strict=True):
        for a, b in zip(gw, ww, strict=True):
            assert a.dtype == torch.float32 and torch.equal(a, b)


def test_a_window_on_another_device_holds_the_same_batches():
    """device="cpu" with snapshots elsewhere keeps the window in host memory; here both are the CPU, so the
    check is that the knob gives the same batches (on a GPU box the cuda variant below crosses devices)."""
    models, tokens = [tiny(s) for s in range(2)], _tokens()
    a = ShuffleStream(models, tokens, HOOK, 5, buffer_seqs=3)
    b = ShuffleStream(models, tokens, HOOK, 5, buffer_seqs=3, device="cpu")
    for x, y in zip(a._window_batches(0, 1, 0), b._window_batches(0, 1, 0), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_stream_on_the_device_equals_run_with_cache(device):
    models, tokens = [tiny(s, device) for s in range(3)], _tokens()
    s = ShuffleStream(models, tokens, HOOK, 11, buffer_seqs=6, seed=1)
    got = torch.cat(list(s._window_batches(0, 0, 0)))
    assert got.device.type == torch.device(device).type  # the window stayed with the snapshots
    keep = keep_mask(tokens)
    seqs = s._plan(0)[0][:6].sort().values
    ref = torch.stack([m.run_with_cache(tokens[seqs].to(device))[1][HOOK] for m in models], 2)[keep[seqs].to(device)]
    key = torch.randn(3 * D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    order = lambda x: x[(x.flatten(1).double() @ key).argsort()]  # noqa: E731 (rows as a set)
    torch.testing.assert_close(order(got), order(ref.float()), rtol=1e-5, atol=1e-5)
    if device != "cpu":  # the host window gives the same batches as the device window
        h = ShuffleStream(models, tokens, HOOK, 11, buffer_seqs=6, seed=1, device="cpu")
        torch.testing.assert_close(torch.cat(list(h._window_batches(0, 0, 0))), got.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_harvest_on_the_device_equals_run_with_cache(tmp_path, device):
    models, tokens = [tiny(s, device) for s in range(2)], _tokens()[:8]
    store = harvest(models, tokens, HOOK, tmp_path, batch_size=3, dtype="float32", shard_seqs=4, progress=False,
                    autocast="none")
    parts = [store.load_shard(i) for i in range(len(store.shard_sizes))]
    acts, pos = torch.cat([p["acts"] for p in parts]).float(), torch.cat([p["positions"] for p in parts])
    ref = torch.stack([m.run_with_cache(tokens.to(device))[1][HOOK] for m in models], 2).cpu()
    torch.testing.assert_close(acts, ref.flatten(0, 1)[pos], rtol=1e-5, atol=1e-5)
