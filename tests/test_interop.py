"""sae-lens export: the saved SAE loads with SAE.load_from_disk and equals the crosscoder slice."""

import pytest
import torch
from sae_lens import SAE

from crosscoders.config import CrosscoderConfig
from crosscoders.interop import export_sae_lens
from crosscoders.model import Crosscoder


def generic(activation, S, seed=0):
    m = Crosscoder(CrosscoderConfig(n_sources=S, d_in=8, d_sae=32, activation=activation, seed=seed))
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


def test_slice_of_a_multi_source_crosscoder_is_its_per_source_code(tmp_path):
    m = generic("jumprelu", S=3, seed=1)
    export_sae_lens(m, tmp_path, source=2)
    sae = SAE.load_from_disk(tmp_path)
    x = torch.randn(64, 3, 8)
    with torch.no_grad():
        f = m.encode_per_source(x)[:, 2]
        torch.testing.assert_close(sae.encode(x[:, 2]), f, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae.decode(f), m.decode(f)[:, 2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="source must be in 0..2"):
        export_sae_lens(m, tmp_path / "x", source=3)
