"""Latent Scaling on planted data where the answer is known: a latent whose decoder was zeroed in one
snapshot although the data still carry it there is flagged; the others' beta match their norms."""

import torch

from crosscoders.config import CrosscoderConfig
from crosscoders.latent_scaling import latent_scaling
from crosscoders.model import Crosscoder
from crosscoders.synthetic import PlantedFeatures, SyntheticConfig


def test_beta_recovers_planted_profile_and_flags_a_zeroed_decoder():
    S, D, F = 4, 16, 8
    truth = PlantedFeatures(SyntheticConfig(n_sources=S, d_in=D, n_features=F, max_rotation=0.0, noise=0.0,
                                            p_active=0.2, profile_floor=0.2, seed=0))
    u = torch.linalg.qr(torch.randn(D, F, generator=torch.Generator().manual_seed(1)))[0].T  # orthonormal
    truth.directions = u[None].expand(S, F, D).clone()
    p = truth.profiles  # [F, S]
    m = Crosscoder(CrosscoderConfig(n_sources=S, d_in=D, d_sae=F, activation="relu"))
    with torch.no_grad():
        m.W_enc.copy_(u.T[None] * (p / p.pow(2).sum(1, keepdim=True)).T[:, None, :])  # pre_i = a_i
        m.b_enc.zero_()
        m.b_dec.zero_()
        m.W_dec.copy_(p.T[:, :, None] * u[None])
        s_gone = int((p[0] < p[0].max()).float().argmax())  # a snapshot that is not feature 0's peak
        m.W_dec[s_gone, 0] = 0.0  # the crosscoder says "absent"; the data still carry it
    x = [truth.batch(i, 512) for i in range(4)]
    out = latent_scaling(m, x)
    beta = out["beta_activation"]
    torch.testing.assert_close(beta, p, atol=1e-4, rtol=1e-4)  # beta is the planted profile, norms or not
    want = torch.zeros(F, S, dtype=torch.bool)
    want[0, s_gone] = p[0, s_gone] >= 0.5 * p[0].max()
    assert torch.equal(out["flagged"], want)
    # error version: the zeroed slice leaves feature 0 entirely to the residual, beta_error sees it too
    assert abs(out["beta_error"][0, s_gone] - p[0, s_gone]) < 1e-4


def test_latent_scaling_on_a_run_matches_a_direct_least_squares_fit(tiny_run):
    """The analyze stage's Latent Scaling (three doors: [analyze] latent_scaling, Run.latent_scaling(), the
    feature columns) against beta refitted here by torch.linalg.lstsq on the same held-out activations."""
    import evolution
    from crosscoders.store import ActivationStore

    _, run_dir, _ = tiny_run
    r = evolution.load_run(run_dir)
    ls = r.latent_scaling()
    m = r.crosscoder
    H, S = m.cfg.d_sae, m.cfg.n_sources
    assert ls["beta_activation"].shape == ls["norm"].shape == ls["flagged"].shape == (H, S)
    assert (r.features["ls_flagged"].to_numpy() == ls["flagged"].sum(1).numpy()).all()
    store = ActivationStore(next((run_dir / "activations_eval").iterdir()))
    x = torch.cat(list(store.batches(1024, seed=0, normalize=False, n_epochs=1)))[: max(1024, (min(16384, store.n_tokens) // 1024) * 1024)]
    with torch.no_grad():
        f = m.encode(x)
    norm = m.W_dec.norm(dim=-1).T
    peak = norm.argmax(-1)
    alive = (f.reshape(len(x), -1, H) > 0).flatten(0, 1).any(0).nonzero().squeeze(1)[:5]
    assert len(alive) > 0
    for i in alive.tolist():
        a = f[:, i] if f.ndim == 2 else f[:, peak[i], i]
        u = m.W_dec[peak[i], i] / m.W_dec[peak[i], i].norm()
        for s in range(S):
            y = ((x[:, s] - m.b_dec[s]) @ u).double()
            beta = torch.linalg.lstsq(a.double()[:, None], y[:, None]).solution.item()
            assert abs(beta - ls["beta_activation"][i, s].item()) <= 1e-3 * max(1.0, abs(beta))
