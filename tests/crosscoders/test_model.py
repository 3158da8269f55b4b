"""Crosscoder forward pass against a loop reference; init; save/load with the norm scale folded in."""

import pytest
import torch

from crosscoders.config import CrosscoderConfig
from crosscoders.model import Crosscoder, activations_per_snapshot

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


def per_source_reference(m, x):
    """Ge et al. 2025 written with loops: f[s] = act(pre * n_s) / n_s, x_hat_s = f[s] W_dec[s] + b_dec[s]."""
    pre = m.b_enc + sum(x[:, s] @ m.W_enc[s] for s in range(m.cfg.n_sources))
    fs, xs = [], []
    for s in range(m.cfg.n_sources):
        n = m.W_dec[s].norm(dim=-1)
        z = pre * n
        act = torch.relu(z) if m.cfg.activation == "relu" else torch.where(z > m.threshold, z, torch.zeros_like(z))
        fs.append(act / n)
        xs.append(fs[-1] @ m.W_dec[s] + m.b_dec[s])
    return torch.stack(fs, 1), torch.stack(xs, 1)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_per_source_gate_matches_loop_reference(activation):
    m = make(activation, gate="per_source")
    x = torch.randn(32, 3, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x_hat, f = m(x)
        f_ref, x_hat_ref = per_source_reference(m, x)
    assert f.shape == (32, 3, 16)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_hat_ref, rtol=1e-5, atol=1e-5)
    if activation == "jumprelu":  # the gate opens in some sources and not others for the same token
        opened = (f > 0).sum(1)
        assert ((opened > 0) & (opened < 3)).any()
        m.train()
        torch.testing.assert_close(m.encode(x), f)  # training mode: same values, pseudo-gradient only


@pytest.mark.parametrize("activation,gate", [(a, "shared") for a in SCHEMES] + [("relu", "per_source"),
                                                                               ("jumprelu", "per_source")])
def test_activations_per_snapshot_definition(activation, gate):
    m = make(activation, gate=gate).train()  # must switch to inference mode itself
    x = torch.randn(16, 3, 8)
    a = activations_per_snapshot(m, x)
    assert m.training and a.shape == (16, 3, 16)
    with torch.no_grad():
        f = m.eval().encode(x)
    want = f if gate == "per_source" else f[:, None] * m.decoder_norms().T
    torch.testing.assert_close(a, want)


def test_per_source_batchtopk_is_refused():
    with pytest.raises(ValueError, match="gate='per_source'.*batchtopk"):
        make("batchtopk", gate="per_source")


def test_old_reader_names_the_gate_field(tmp_path):
    """A reader whose CrosscoderConfig predates `gate` refuses a per-source model, naming the field."""
    import dataclasses
    import json

    from crosscoders.dataclass_cli import from_dict

    make("jumprelu", gate="per_source").save(tmp_path)
    fields = [(f.name, f.type, f) for f in dataclasses.fields(CrosscoderConfig) if f.name != "gate"]
    Old = dataclasses.make_dataclass("CrosscoderConfig", fields)
    with pytest.raises(ValueError, match="unknown CrosscoderConfig field.*gate"):
        from_dict(Old, json.loads((tmp_path / "cfg.json").read_text()))


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


@pytest.mark.parametrize("activation,gate", [(a, "shared") for a in SCHEMES] + [("jumprelu", "per_source")])
def test_save_load_folds_norm_scale(tmp_path, activation, gate):
    m = make(activation, gate=gate)
    scale = torch.tensor([0.5, 2.0, 7.0])
    raw = 3 * torch.randn(20, 3, 8)
    with torch.no_grad():
        x_hat_norm, f_norm = m(raw * scale[:, None])
        norms = m.decoder_norms().clone()
        m.fold_norm_scale(scale)
        m.save(tmp_path)
        loaded = Crosscoder.load(tmp_path)
        x_hat_raw, f_raw = loaded(raw)
        per_raw = activations_per_snapshot(loaded, raw)
    assert loaded.cfg == m.cfg
    torch.testing.assert_close(per_raw, m.per_snapshot(f_norm), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_raw, f_norm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat_raw, x_hat_norm / scale[:, None], rtol=1e-5, atol=1e-5)
    # decoder norms stay in the normalised units: comparable across sources whatever the raw scales
    torch.testing.assert_close(loaded.decoder_norms(), norms, rtol=1e-5, atol=1e-6)


def test_load_names_missing_file(tmp_path):
    make().save(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights.safetensors"):
        Crosscoder.load(tmp_path)


@pytest.mark.parametrize("activation, gate", [("batchtopk", "shared"), ("relu", "shared"), ("relu", "per_source"),
                                              ("jumprelu", "shared"), ("jumprelu", "per_source")])
def test_a_block_of_latents_reads_what_the_full_dictionary_reads(activation, gate):
    """`latents(cols)` on `pre[..., cols]` gives the full model's per-snapshot activations of those latents."""
    torch.manual_seed(0)
    cc = Crosscoder(CrosscoderConfig(n_sources=3, d_in=8, d_sae=40, activation=activation, gate=gate, k=4))
    with torch.no_grad():
        cc.threshold.uniform_(0, 0.3)
        cc.W_dec.mul_(torch.rand(3, 40, 1) + 0.1)
        cc.b_enc.normal_()
    cc.eval()
    pre = cc.pre_acts(torch.randn(50, 3, 8))
    full = cc.activations_from_pre(pre)
    cols = slice(7, 29)
    got = cc.latents(cols).activations_from_pre(pre[..., cols])
    assert torch.equal(got, full[..., cols]) and (got > 0).any()
