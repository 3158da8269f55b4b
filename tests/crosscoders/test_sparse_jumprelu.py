"""Sparse JumpReLU kernels, shared and per-source gate: the same loss and gradients as the dense path, the sparse
set is exactly what the dense backward reads, the automatic switch, training."""

import pytest
import torch

from crosscoders import activations as A
from crosscoders import sparse_jumprelu as SJ
from crosscoders.config import CrosscoderConfig, TrainConfig
from crosscoders.io import read_jsonl
from crosscoders.losses import crosscoder_loss
from crosscoders.model import Crosscoder
from crosscoders.synthetic import PlantedFeatures, SyntheticConfig
from crosscoders.train import train

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
_FORWARD = SJ.forward
SHAPES = {"B40xS3xD8xH64": (40, 3, 8, 64), "B33xS5xD4xH48": (33, 5, 4, 48)}


def loss_and_grads(model, x, sparse, **kw):
    model.zero_grad(set_to_none=True)
    out = crosscoder_loss(model, x, 1.0, sparse=sparse, **kw)
    out.total.backward()
    return out, {k: getattr(model, k).grad.clone() for k in PARAMS}


def trained_model(dtype, gate, ste, shape, bandwidth=0.1, seed=0):
    """A model whose weights are off their init, with thresholds spread so that some entries sit in the window."""
    _, S, D, H = shape
    cfg = CrosscoderConfig(n_sources=S, d_in=D, d_sae=H, activation="jumprelu", gate=gate, seed=seed,
                           jumprelu_bandwidth=bandwidth, jumprelu_ste_to_input=ste)
    m = Crosscoder(cfg).to(dtype).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=dtype))
        m.threshold[:4] = -0.1  # clamped to 0: no gradient there in either path
    return m


def code_of(m, x):
    with torch.no_grad():
        return SJ.gate(m.pre_acts(x), m.gate_norms(), m.threshold.clamp(min=0), m.cfg.jumprelu_bandwidth)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("penalty", ["auto", "tanh", "tanh_quad", "l1"])
@pytest.mark.parametrize("ste", [False, True], ids=["deepmind", "ste_to_input"])
@pytest.mark.parametrize("gate", ["shared", "per_source"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_loss_and_every_gradient_equal_the_dense_path(dtype, gate, ste, penalty, shape):
    m = trained_model(dtype, gate, ste, shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape[:3], generator=g, dtype=dtype)
    dead = torch.zeros(shape[3], dtype=torch.bool)
    dead[torch.randperm(shape[3], generator=g)[:10]] = True
    code = code_of(m, x)
    f_E = code.f[(code.rows, code.srcs, code.cols) if gate == "per_source" else (code.rows, code.cols)]
    assert (f_E > 0).any() and (f_E == 0).any()  # open entries and closed ones inside the window
    kw = dict(dead=dead, pre_act_coef=0.1, sparsity=penalty)
    dense, g_dense = loss_and_grads(m, x, False, **kw)
    sparse, g_sparse = loss_and_grads(m, x, True, **kw)
    assert dense.aux.item() > 0 and dense.sparsity.item() > 0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for name in ("total", "mse", "sparsity", "aux", "mse_per_source", "x_hat", "f"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name).detach(), **tol, msg=name)
    for k in PARAMS:
        assert g_dense[k].abs().max() > 0, k
        torch.testing.assert_close(g_sparse[k], g_dense[k], **tol, msg=k)


@pytest.mark.parametrize("gate", ["shared", "per_source"])
def test_the_sparse_set_holds_every_entry_the_dense_backward_reads(gate):
    # with ste_to_input every open or window entry passes a gradient to its own pre-activation, and no other
    # entry does: the elementwise gradient of f = jumprelu(pre, N, theta) at a random upstream gradient. E holds
    # them all, and otherwise only entries within 1e-4 of theta + eps below the window.
    m = trained_model(torch.float32, gate, True, SHAPES["B40xS3xD8xH64"])
    x = torch.randn(40, 3, 8)
    code = code_of(m, x)
    with torch.no_grad():
        p = m.gate_input(m.pre_acts(x))
        N = m.gate_norms()
        th = m.threshold.clamp(min=0)
    p = p.expand(-1, N.shape[0], -1).clone() if gate == "per_source" else p.clone()
    p.requires_grad_()
    f = A.jumprelu(p, N, th, m.cfg.jumprelu_bandwidth, True)
    f.backward(torch.rand(f.shape, dtype=f.dtype) + 0.5)
    reads = p.grad != 0
    keep = torch.zeros_like(reads)
    keep[(code.rows, code.srcs, code.cols) if gate == "per_source" else (code.rows, code.cols)] = True
    assert not (reads & ~keep).any()
    eps = m.cfg.jumprelu_bandwidth
    near = p.detach() * N > th - eps / 2 - 2e-4 * (th + eps)
    assert not (keep & ~reads & ~near).any()
    assert 0 < reads.sum() < reads.numel() and (keep & ~reads).sum() <= 0.01 * keep.sum()
    torch.testing.assert_close(code.f, f.detach().view_as(code.f), rtol=0, atol=0)  # the code itself, exactly


def test_automatic_switch_reads_each_batch_density(monkeypatch):
    m = trained_model(torch.float32, "per_source", False, SHAPES["B40xS3xD8xH64"])
    x = torch.randn(40, 3, 8)
    calls = []
    monkeypatch.setattr(SJ, "forward", lambda *a: calls.append(1) or _FORWARD(*a))
    density = code_of(m, x).density
    monkeypatch.setitem(SJ.CROSSOVER, ("cpu", "per_source"), density * 0.99)
    dense, g_dense = loss_and_grads(m, x, None)
    assert calls == []
    monkeypatch.setitem(SJ.CROSSOVER, ("cpu", "per_source"), density)
    sparse, g_sparse = loss_and_grads(m, x, None)
    assert calls == [1]
    torch.testing.assert_close(sparse.total, dense.total)  # the dense path from the pre computed without grad
    for k in PARAMS:
        torch.testing.assert_close(g_sparse[k], g_dense[k], rtol=1e-5, atol=1e-6, msg=k)
    crosscoder_loss(m, x, 1.0, sparsity="l1_l2", sparse=True)  # l1_l2 ties every closed source: dense
    crosscoder_loss(m.eval(), x, 1.0, sparse=True)  # eval mode: the inference gate, dense
    assert calls == [1]
    assert not SJ.pays(code_of(m.train(), x), True, "meta")  # devices never measured stay dense
    monkeypatch.setattr(A, "host_sync_is_free", lambda t: False)  # CUDA: counting E would stall the host
    monkeypatch.setattr(SJ, "gate", lambda *a: pytest.fail("counted the sparse set"))
    crosscoder_loss(m, x, 1.0)
    assert calls == [1]


def test_sparse_under_bf16_autocast_matches_dense():
    m = trained_model(torch.float32, "per_source", True, SHAPES["B40xS3xD8xH64"])
    x = torch.randn(40, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense, g_dense = loss_and_grads(m, x, False)
        sparse, g_sparse = loss_and_grads(m, x, True)
    torch.testing.assert_close(sparse.total.float(), dense.total.float(), rtol=2e-2, atol=1e-3)
    for k in PARAMS:
        assert g_sparse[k].dtype == torch.float32
        torch.testing.assert_close(g_sparse[k], g_dense[k], rtol=5e-2, atol=5e-3, msg=k)


def test_per_source_training_through_the_sparse_path_learns_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setitem(SJ.CROSSOVER, ("cpu", "per_source"), 1.0)  # every step sparse
    calls = []
    monkeypatch.setattr(SJ, "forward", lambda *a: calls.append(1) or _FORWARD(*a))
    truth = PlantedFeatures(SyntheticConfig(n_sources=3, d_in=8, n_features=12, seed=3))
    cc = CrosscoderConfig(n_sources=3, d_in=8, d_sae=32, activation="jumprelu", gate="per_source")
    cfg = TrainConfig(crosscoder=cc, steps=24, lr=3e-3, dead_tokens=64 * 2, log_every=4, checkpoint_every=8,
                      progress=False)
    ref = train(cfg, truth.batch_source(64), tmp_path / "ref")
    assert len(calls) == 24
    mse = [r["mse"] for r in read_jsonl(tmp_path / "ref/train_log.jsonl")]
    assert mse[-1] < 0.6 * mse[0]
    monkeypatch.setitem(SJ.CROSSOVER, ("cpu", "per_source"), -1.0)  # the same run through the dense path
    dense = train(cfg, truth.batch_source(64), tmp_path / "dense")
    assert len(calls) == 24
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v, dense.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)
    monkeypatch.setitem(SJ.CROSSOVER, ("cpu", "per_source"), 1.0)

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
