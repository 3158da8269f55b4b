"""Sparse BatchTopK kernels: the same loss and gradients as the dense path, the automatic switch, training."""

import pytest
import torch

from crosscoders import activations as A
from crosscoders import sparse as S
from crosscoders.config import CrosscoderConfig, TrainConfig
from crosscoders.io import read_jsonl
from crosscoders.losses import crosscoder_loss
from crosscoders.model import Crosscoder
from crosscoders.synthetic import PlantedFeatures, SyntheticConfig
from crosscoders.train import train

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def loss_and_grads(model, x, sparse, dead=None, **kw):
    model.zero_grad(set_to_none=True)
    out = crosscoder_loss(model, x, 1.0, dead, sparse=sparse, **kw)
    out.total.backward()
    return out, {k: getattr(model, k).grad.clone() for k in PARAMS}


def trained_model(dtype, S_=3, D=8, H=64, k=3.0, seed=0):
    """A model a few steps into training, so that codes, biases and decoder norms are not at their init."""
    m = Crosscoder(CrosscoderConfig(n_sources=S_, d_in=D, d_sae=H, activation="batchtopk", k=k, seed=seed))
    m = m.to(dtype).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=dtype))
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_auxk", [False, True])
@pytest.mark.parametrize("nested", [0.0, 0.5], ids=["k", "k_and_nested"])
def test_sparse_loss_and_every_gradient_equal_the_dense_path(dtype, with_auxk, nested):
    m = trained_model(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, 8, generator=g, dtype=dtype)
    dead = None
    if with_auxk:
        dead = torch.zeros(64, dtype=torch.bool)
        dead[torch.randperm(64, generator=g)[:20]] = True
    dense, g_dense = loss_and_grads(m, x, sparse=False, dead=dead, k_aux=5, nested_k_frac=nested)
    sparse, g_sparse = loss_and_grads(m, x, sparse=True, dead=dead, k_aux=5, nested_k_frac=nested)
    assert (dense.nested is not None) == (nested > 0)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    if with_auxk and dtype == torch.float64:  # the dense AuxK takes pre.float(): its gradient is fp32-exact
        tol = dict(rtol=1e-7, atol=1e-9)
    assert (dense.aux.item() > 0) == with_auxk
    for name in ("total", "mse", "aux", "min_kept", "mse_per_source", "x_hat", "f") + (("nested",) if nested else ()):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name).detach(), **tol, msg=name)
    for k in PARAMS:
        assert g_dense[k].abs().max() > 0, k
        torch.testing.assert_close(g_sparse[k], g_dense[k], **tol, msg=k)


def test_sparse_kernels_against_hand_written_gradients():
    # x_hat = W_dec^T f at a few entries; dL/dW_dec[s, i] = sum_b f[b, i] g[b, s]; dL/dW_enc[s, :, i] =
    # sum_b dL/dpre[b, i] x[b, s], written out with dense einsums as the reference.
    m = trained_model(torch.float64, H=16)
    x = torch.randn(6, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        pre = m.pre_acts(x)
    rows = torch.tensor([0, 0, 2, 3, 3, 5])
    cols = torch.tensor([1, 7, 7, 0, 15, 3])
    with torch.no_grad():  # entries must have pre > 0
        m.b_enc[cols] += pre[rows, cols].abs() + 0.1
        pre = m.pre_acts(x)
    out = S.sparse_decode(m, x, pre, rows, cols)
    w = torch.randn(out.shape, dtype=torch.float64)
    (out * w).sum().backward()
    mask = torch.zeros(6, 16, dtype=torch.float64)
    mask[rows, cols] = 1
    W_enc, b_enc, W_dec = (p.detach().clone().requires_grad_() for p in (m.W_enc, m.b_enc, m.W_dec))
    f = (torch.einsum("bsd,sdh->bh", x, W_enc) + b_enc) * mask
    ref = torch.einsum("bh,shd->bsd", f, W_dec)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref)
    for p, r in ((m.W_enc, W_enc), (m.b_enc, b_enc), (m.W_dec, W_dec)):
        torch.testing.assert_close(p.grad, r.grad)


@pytest.mark.parametrize("positive", [0.5, 0.001])
def test_prefiltered_batch_top_equals_torch_topk(positive):
    # the pooled per-row bound is exact; with few positive scores it keeps zeros, which code nothing
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(256, 512, generator=g) * (torch.rand(256, 512, generator=g) < positive)
    values, index = A.top_of_batch(scores, 256 * 4)
    ref = torch.topk(scores.flatten(), 256 * 4, sorted=False)
    assert index.unique().numel() == index.numel() and torch.equal(scores.flatten()[index], values)
    torch.testing.assert_close(values.sort().values, ref.values.sort().values)
    if positive > 0.1:
        assert torch.equal(index.sort().values, ref.indices.sort().values)


def test_automatic_switch_follows_the_crossover(monkeypatch):
    assert S.pays(32, 16384, "cpu") and not S.pays(32, 256, "cpu")
    assert S.pays(k=S.CROSSOVER["cpu"] * 4096, d_sae=4096, device="cpu")
    assert not S.pays(32, 16384, "meta")  # devices never measured stay dense
    m = trained_model(torch.float32, H=64, k=2.0)
    x = torch.randn(16, 3, 8)
    calls = []
    monkeypatch.setattr(S, "decode_code", lambda *a: calls.append(1) or m.decode(a[3]))
    monkeypatch.setitem(S.CROSSOVER, "cpu", 1 / 64)
    crosscoder_loss(m, x, 1.0)  # k / d_sae = 1/32: dense
    assert calls == []
    monkeypatch.setitem(S.CROSSOVER, "cpu", 1 / 16)
    crosscoder_loss(m, x, 1.0)
    assert calls == [1]
    relu = Crosscoder(CrosscoderConfig(n_sources=3, d_in=8, d_sae=64, activation="relu")).train()
    crosscoder_loss(relu, x, 1.0, sparse=True)  # other schemes ignore the switch
    assert calls == [1]


def test_sparse_under_bf16_autocast_matches_dense():
    m = trained_model(torch.float32)
    x = torch.randn(32, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense, g_dense = loss_and_grads(m, x, sparse=False)
        sparse, g_sparse = loss_and_grads(m, x, sparse=True)
    torch.testing.assert_close(sparse.total.float(), dense.total.float(), rtol=2e-2, atol=1e-3)
    for k in PARAMS:
        assert g_sparse[k].dtype == torch.float32
        torch.testing.assert_close(g_sparse[k], g_dense[k], rtol=5e-2, atol=5e-3, msg=k)


def test_training_through_the_sparse_path_learns_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setitem(S.CROSSOVER, "cpu", 1.0)  # every step sparse
    truth = PlantedFeatures(SyntheticConfig(n_sources=3, d_in=8, n_features=12, seed=3))
    cc = CrosscoderConfig(n_sources=3, d_in=8, d_sae=32, activation="batchtopk", k=2.0)
    cfg = TrainConfig(crosscoder=cc, steps=24, lr=3e-3, dead_tokens=64 * 2, log_every=4, checkpoint_every=8,
                      progress=False)
    ref = train(cfg, truth.batch_source(64), tmp_path / "ref")
    mse = [r["mse"] for r in read_jsonl(tmp_path / "ref/train_log.jsonl")]
    assert mse[-1] < 0.5 * mse[0]
    assert any(r["aux"] > 0 for r in read_jsonl(tmp_path / "ref/train_log.jsonl"))  # AuxK ran sparse too

    def dies_at_19(start):
        for i, x in enumerate(truth.batch_source(64)(start), start):
            if i == 19:
                raise RuntimeError("killed")
            yield x
    with pytest.raises(RuntimeError):
        train(cfg, dies_at_19, tmp_path / "run")
    resumed = train(cfg, truth.batch_source(64), tmp_path / "run")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_bias_gradient_is_a_deterministic_segment_sum_bitwise_equal_to_index_add(monkeypatch):
    # index_add_ adds with atomics on CUDA (order varies run to run; exact resume drifts): the kernels use an
    # embedding_bag per latent instead, which on the CPU makes index_add_'s additions in its order
    g = torch.Generator().manual_seed(3)
    f = torch.rand(512, 256, generator=g) * (torch.rand(512, 256, generator=g) < 0.05)
    rows, cols = f.nonzero(as_tuple=True)
    act = S.active(rows, cols, 512, 256)
    values = torch.randn(rows.numel(), generator=g) * 10 ** torch.randint(-3, 4, (rows.numel(),), generator=g)
    before = torch.zeros(256).index_add_(0, cols, values)
    monkeypatch.setattr(torch.Tensor, "index_add_", lambda *a, **k: (_ for _ in ()).throw(AssertionError("index_add_")))
    assert torch.equal(S.latent_sum(values, act), before)
    m = trained_model(torch.float32, H=64)
    x = torch.randn(16, 3, 8, generator=g)
    loss_and_grads(m, x, sparse=True, dead=torch.ones(64, dtype=torch.bool), k_aux=4)  # the backward never calls it
