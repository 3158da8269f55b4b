"""sae-lens export: the saved SAE loads with SAE.load_from_disk and equals the crosscoder slice."""

import pytest
import torch
from sae_lens import SAE

from crosscoders.config import CrosscoderConfig
from crosscoders.interop import export_sae_lens
from crosscoders.model import Crosscoder


def generic(activation, S, seed=0, gate="shared"):
    m = Crosscoder(CrosscoderConfig(n_sources=S, d_in=8, d_sae=32, activation=activation, seed=seed, gate=gate))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.W_enc, m.W_dec, m.b_enc, m.b_dec):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        m.threshold.copy_(0.3 * torch.rand(32, generator=g))
        m.fold_norm_scale(torch.rand(S, generator=g) + 0.5)  # a saved model has its scales folded in
    return m.eval()


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
def test_one_source_crosscoder_equals_exported_sae(tmp_path, activation):
    m = generic(activation, S=1)
    export_sae_lens(m, tmp_path, hook_name="blocks.1.hook_resid_post", model_name="mini")
    sae = SAE.load_from_disk(tmp_path)
    assert sae.cfg.architecture() == ("standard" if activation == "relu" else "jumprelu")
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(64, 1, 8)
    with torch.no_grad():
        x_hat, f = m(x)
        f_sae = sae.encode(x[:, 0])
        out = sae(x[:, 0])
    assert 0 < (f > 0).float().mean() < 1
    torch.testing.assert_close(f_sae, f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, x_hat[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation,gate", [("jumprelu", "per_source"), ("relu", "per_source"),
                                             ("jumprelu", "shared"), ("batchtopk", "shared")])
def test_export_of_snapshot_s_reproduces_its_codes_and_reconstruction(tmp_path, activation, gate):
    m = generic(activation, S=3, seed=1, gate=gate)
    export_sae_lens(m, tmp_path, source=2)
    sae = SAE.load_from_disk(tmp_path)
    x = 3 * torch.randn(64, 3, 8)
    with torch.no_grad():
        x_hat, f = m(x)
        f2 = f[:, 2] if gate == "per_source" else f
        got = sae.encode(x.reshape(64, -1))
        torch.testing.assert_close(got, f2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae(x.reshape(64, -1)).view(64, 3, 8)[:, 2], x_hat[:, 2], rtol=1e-5, atol=1e-5)
    assert 0 < (f2 > 0).float().mean() < 1
    with pytest.raises(ValueError, match="source must be in 0..2"):
        export_sae_lens(m, tmp_path / "x", source=3)


@pytest.mark.parametrize("gate", ["shared", "per_source"])
def test_own_source_export_reads_one_snapshot(tmp_path, gate):
    m = generic("jumprelu", S=3, seed=2, gate=gate)
    sae = SAE.load_from_disk(export_sae_lens(m, tmp_path, source=1, reads="own_source"))
    x = 3 * torch.randn(64, 3, 8)
    only = torch.zeros_like(x)
    only[:, 1] = x[:, 1]  # the crosscoder with the other sources' inputs at zero
    with torch.no_grad():
        f = m.encode(only)
        torch.testing.assert_close(sae.encode(x[:, 1]), f[:, 1] if gate == "per_source" else f, rtol=1e-5, atol=1e-6)
