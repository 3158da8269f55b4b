"""The losses, the sparse kernels and training on a device against the CPU: the same bodies run on "cpu" in the
suite (a device against itself) and on "cuda" under `-m cuda` (benchmarks/gpu_check.sh), in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from crosscoders.config import CrosscoderConfig, TrainConfig
from crosscoders.losses import crosscoder_loss
from crosscoders.model import Crosscoder
from crosscoders.synthetic import PlantedFeatures, SyntheticConfig
from crosscoders.train import train
from tests.conftest import DEVICES

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
SCHEMES = {  # (crosscoder config, crosscoder_loss keywords)
    "relu_l1_l2": (dict(activation="relu"), dict()),
    "jumprelu_per_source_tanh_quad": (dict(activation="jumprelu", gate="per_source", tanh_scale=4.0),
                                      dict(sparsity="tanh_quad", frequency_scale=0.01)),
    "batchtopk_dense": (dict(activation="batchtopk", k=3.0), dict(sparse=False, k_aux=5)),
    "batchtopk_sparse": (dict(activation="batchtopk", k=3.0), dict(sparse=True, k_aux=5)),
}


def _model(cc: dict, seed=0) -> Crosscoder:
    m = Crosscoder(CrosscoderConfig(n_sources=3, d_in=8, d_sae=64, seed=seed, **cc)).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a few steps into training: codes, biases and norms off their init
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def _loss_and_grads(m: Crosscoder, x, dead, autocast: bool, **kw):
    m.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = crosscoder_loss(m, x, 0.5, dead, **kw)
    out.total.backward()
    return out, {k: getattr(m, k).grad for k in PARAMS}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_loss_and_gradients_on_the_device_equal_the_cpu(device, precision, scheme):
    cc, kw = SCHEMES[scheme]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 3, 8, generator=g)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=g)[:16]] = True
    bf16 = precision == "bf16"
    ref, g_ref = _loss_and_grads(_model(cc), x, dead, bf16, **kw)
    got, g_got = _loss_and_grads(_model(cc).to(device), x.to(device), dead.to(device), bf16, **kw)
    tol = dict(rtol=3e-2, atol=3e-3) if bf16 else dict(rtol=1e-4, atol=1e-5)
    for name in ("total", "mse", "aux", "x_hat"):
        torch.testing.assert_close(getattr(got, name).detach().float().cpu(), getattr(ref, name).detach().float(),
                                   **tol, msg=name)
    for k in PARAMS:
        assert g_ref[k].abs().max() > 0, k
        torch.testing.assert_close(g_got[k].cpu(), g_ref[k], **tol, msg=k)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
def test_training_on_the_device_resumes_exactly(tmp_path, device, activation):
    truth = PlantedFeatures(SyntheticConfig(n_sources=3, d_in=8, n_features=12, seed=3))
    cc = CrosscoderConfig(n_sources=3, d_in=8, d_sae=24, activation=activation, k=2.0)
    cfg = TrainConfig(crosscoder=cc, steps=16, lr=3e-3, sparsity_coef=0.5, dead_tokens=64 * 4, log_every=4,
                      checkpoint_every=8, progress=False, device=device, autocast="none")
    src = truth.batch_source(64)

    def crashing(start):
        for i, x in enumerate(src(start), start):
            if i == 11:
                raise Crash
            yield x
    ref = train(cfg, src, tmp_path / "ref")
    with pytest.raises(Crash):
        train(cfg, crashing, tmp_path / "run")
    resumed = train(cfg, src, tmp_path / "run")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
