"""Crosscoder forward pass against a loop reference; init; save/load with the norm scale folded in."""

import pytest
import torch

from crosscoders.config import CrosscoderConfig
from crosscoders.model import Crosscoder

SCHEMES = ["relu", "jumprelu", "batchtopk"]


def make(activation="relu", S=3, D=8, H=16, seed=0, **kw):
    m = Crosscoder(CrosscoderConfig(n_sources=S, d_in=D, d_sae=H, activation=activation, seed=seed, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move off the symmetric init so the tests see generic weights
        for p in (m.W_enc, m.W_dec, m.b_enc, m.b_dec):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        m.threshold.copy_(0.2 * torch.rand(H, generator=g))
    return m.eval()


def reference(m, x):
    """Lindsey et al. 2024 written with loops over sources: f = act(sum_s x_s W_enc[s] + b_enc)."""
    pre = m.b_enc.clone()
    pre = pre + sum(x[:, s] @ m.W_enc[s] for s in range(m.cfg.n_sources))
    norm = torch.stack([m.W_dec[s].norm(dim=-1) for s in range(m.cfg.n_sources)]).sum(0)
    if m.cfg.activation == "relu":
        f = torch.relu(pre)
    else:
        f = torch.where(pre * norm > m.threshold, torch.relu(pre), torch.zeros_like(pre))
    x_hat = torch.stack([f @ m.W_dec[s] + m.b_dec[s] for s in range(m.cfg.n_sources)], dim=1)
    return f, x_hat


@pytest.mark.parametrize("activation", SCHEMES)
def test_forward_matches_loop_reference(activation):
    m = make(activation)
    x = torch.randn(32, 3, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x_hat, f = m(x)
        f_ref, x_hat_ref = reference(m, x)
    assert f.shape == (32, 16) and x_hat.shape == (32, 3, 8)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_hat_ref, rtol=1e-5, atol=1e-5)
    if activation != "relu":
        assert 0 < (f > 0).float().mean() < 0.6  # the gate really closes some latents


@pytest.mark.parametrize("activation", SCHEMES)
def test_encode_per_source_is_each_encoder_alone(activation):
    m = make(activation)
    x = torch.randn(16, 3, 8)
    with torch.no_grad():
        per = m.encode_per_source(x)
        for s in range(3):
            only = torch.zeros_like(x)
            only[:, s] = x[:, s]
            # zeroing the other sources' inputs removes exactly their encoder terms
            torch.testing.assert_close(per[:, s], m.encode(only), rtol=1e-5, atol=1e-5)


def test_batchtopk_training_mode_keeps_k_per_token_on_average():
    m = make("batchtopk", k=3.0).train()
    x = torch.randn(64, 3, 8)
    f = m.encode(x)
    assert int((f > 0).sum()) == 3 * 64
    assert (f > 0).sum(-1).float().std() > 0  # per token it varies: a batch-level budget


def test_init_encoder_is_decoder_transpose_with_small_norm():
    m = Crosscoder(CrosscoderConfig(n_sources=4, d_in=8, d_sae=32, dec_init_norm=0.1))
    torch.testing.assert_close(m.W_enc, m.W_dec.transpose(1, 2))
    concat = m.W_dec.permute(1, 0, 2).reshape(32, -1).norm(dim=-1)
    torch.testing.assert_close(concat, torch.full((32,), 0.1))
    assert m.decoder_norms().shape == (32, 4)


def test_wrong_shape_is_a_clear_error():
    m = make()
    with pytest.raises(ValueError, match="n_sources=3, d_in=8"):
        m.encode(torch.randn(4, 2, 8))
    with pytest.raises(ValueError, match=r"\[4, 3, 9\]"):
        m(torch.randn(4, 3, 9))


@pytest.mark.parametrize("activation", SCHEMES)
def test_save_load_folds_norm_scale(tmp_path, activation):
    m = make(activation)
    scale = torch.tensor([0.5, 2.0, 7.0])
    raw = 3 * torch.randn(20, 3, 8)
    with torch.no_grad():
        x_hat_norm, f_norm = m(raw * scale[:, None])
        norms = m.decoder_norms().clone()
        m.fold_norm_scale(scale)
        m.save(tmp_path)
        loaded = Crosscoder.load(tmp_path)
        x_hat_raw, f_raw = loaded(raw)
    assert loaded.cfg == m.cfg
    torch.testing.assert_close(f_raw, f_norm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat_raw, x_hat_norm / scale[:, None], rtol=1e-5, atol=1e-5)
    # decoder norms stay in the normalised units: comparable across sources whatever the raw scales
    torch.testing.assert_close(loaded.decoder_norms(), norms, rtol=1e-5, atol=1e-6)


def test_load_names_missing_file(tmp_path):
    make().save(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights.safetensors"):
        Crosscoder.load(tmp_path)
