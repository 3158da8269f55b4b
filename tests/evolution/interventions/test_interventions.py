"""Linear replacement, removal and pruning of blocks; the logit lens; feature logit effects: each number
against a second computation (numpy least squares, cached activations, finite differences)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from evolution.interventions.linear_replacement import (
    ReplacementConfig,
    batch_nll,
    block_interventions,
    delta_with_ci,
    fit_affine,
    spliced,
)
from evolution.interventions.logit_effects import logit_effects_matrix, top_effects
from evolution.interventions.logit_lens import logit_lens

BOS = 0


def _model(n_layers=3, seed=0, identity_block: int | None = None) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_mlp=32, d_vocab=30,
                                  act_fn="gelu", normalization_type="LN", seed=seed)
    model = HookedTransformer(cfg).eval()
    if identity_block is not None:  # a block that writes nothing: its output is its input exactly
        b = model.blocks[identity_block]
        with torch.no_grad():
            for p in (b.attn.W_O, b.attn.b_O, b.mlp.W_out, b.mlp.b_out):
                p.zero_()
    return model


def _tokens(n=48, s=16, seed=0, vocab=30) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, vocab, (n, s), generator=g)
    t[:, 0] = BOS
    return t


def test_fit_affine_matches_numpy_lstsq():
    g = np.random.default_rng(0)
    X = g.normal(size=(300, 7))
    Y = X @ g.normal(size=(7, 5)) + g.normal(size=5) + 0.1 * g.normal(size=(300, 5))
    m = fit_affine(torch.tensor(X), torch.tensor(Y))
    ref, *_ = np.linalg.lstsq(np.hstack([X, np.ones((300, 1))]), Y, rcond=None)
    np.testing.assert_allclose(m.W.numpy(), ref[:-1], atol=1e-10)
    np.testing.assert_allclose(m.b.numpy(), ref[-1], atol=1e-10)


def test_spliced_block_outputs_the_least_squares_prediction():
    model, tokens = _model(), _tokens()
    _, cache = model.run_with_cache(tokens)
    X, Y = cache["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_post"]
    m = fit_affine(X[:, 1:].reshape(-1, 16), Y[:, 1:].reshape(-1, 16))
    with spliced(model, {0: m}):
        _, cache2 = model.run_with_cache(tokens)
    nxt = cache2["blocks.1.hook_resid_pre"]  # what block 1 received: the spliced block's output
    torch.testing.assert_close(nxt[:, 1:], m(X[:, 1:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[:, 0], Y[:, 0])  # position 0 keeps the true (constant) output
    with spliced(model, {0: None}, keep_first=False):
        _, cache3 = model.run_with_cache(tokens)
    torch.testing.assert_close(cache3["blocks.1.hook_resid_pre"], X)  # identity: the block removed
    # hooks are gone afterwards
    torch.testing.assert_close(model(tokens), model.run_with_cache(tokens)[0])


def test_removing_an_identity_block_costs_nothing_and_a_real_block_costs_something():
    model, tokens = _model(identity_block=1), _tokens()
    res = block_interventions(model, _tokens(96, seed=1), tokens,
                              ReplacementConfig(n_fit_tokens=1400, n_score_tokens=700, eval_batch_size=8, n_bootstrap=200),
                              bos_token_id=BOS)
    b1 = res["blocks"][1]
    assert b1["identity"]["delta"] == pytest.approx(0, abs=1e-9)
    assert b1["linear"]["delta"] == pytest.approx(0, abs=1e-4)  # the fitted map is the identity
    assert b1["r2_heldout"] == pytest.approx(1, abs=1e-6)
    # a random block does change the loss; its CI brackets the point estimate
    b0 = res["blocks"][0]
    assert abs(b0["identity"]["delta"]) > 1e-3
    assert b0["identity"]["ci"][0] <= b0["identity"]["delta"] <= b0["identity"]["ci"][1]
    # Δloss is the difference of the two losses, recomputed from scratch
    base = batch_nll(model, tokens, 8, BOS)
    with spliced(model, {0: None}):
        removed = batch_nll(model, tokens, 8, BOS)
    assert b0["identity"]["delta"] == pytest.approx(removed[0].sum() / removed[1].sum() - base[0].sum() / base[1].sum())
    # pruning: the identity block is the most linear, so k = 1 removes it for free
    assert res["prune"]["order"][0] == 1 and res["prune"]["identity"][0]["delta"] == pytest.approx(0, abs=1e-9)
    assert len(res["prune"]["linear"]) == 3


def test_delta_ci_on_planted_batches():
    n = np.full(200, 100.0)
    base = (np.full(200, 250.0), n)
    g = np.random.default_rng(0)
    other = (base[0] + 100 * (0.3 + 0.1 * g.normal(size=200)), n)
    out = delta_with_ci(base, other, n_boot=2000)
    assert out["delta"] == pytest.approx(0.3, abs=0.02)
    se = 0.1 / np.sqrt(200)
    assert out["ci"][1] - out["ci"][0] == pytest.approx(2 * 1.96 * se, rel=0.2)
    with pytest.raises(ValueError):
        delta_with_ci(base, (other[0], n + 1))


def test_distillation_does_not_increase_the_loss():
    model = _model(n_layers=2, seed=3)
    cfg = ReplacementConfig(n_fit_tokens=600, n_score_tokens=300, n_bootstrap=50, prune=False, distill_steps=30,
                            distill_lr=3e-3)
    res = block_interventions(model, _tokens(64, seed=2), _tokens(32, seed=3), cfg, BOS)
    for b in res["blocks"]:
        assert b["linear_distilled"]["delta"] <= b["linear"]["delta"] + 1e-3


def test_logit_lens_last_layer_is_the_model_and_middle_layers_match_a_manual_readout():
    model, tokens = _model(), _tokens(16)
    ll = logit_lens(model, tokens, batch_size=5, bos_token_id=BOS)
    assert len(ll["loss"]) == 4 and ll["top1_agreement"][-1] == 1.0
    logits, cache = model.run_with_cache(tokens)
    tgt = tokens[:, 1:]
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 30).double(), tgt.reshape(-1)).item()
    assert ll["loss"][-1] == pytest.approx(full, rel=1e-6)
    mid = model.unembed(model.ln_final(cache["blocks.1.hook_resid_pre"]))[:, :-1].double()
    assert ll["loss"][1] == pytest.approx(torch.nn.functional.cross_entropy(mid.reshape(-1, 30), tgt.reshape(-1)).item(), rel=1e-6)
    agree = (mid.argmax(-1) == logits[:, :-1].argmax(-1)).double().mean().item()
    assert ll["top1_agreement"][1] == pytest.approx(agree)


def test_logit_effects_equal_the_finite_difference_of_the_readout():
    """With the direction orthogonal to the (centred) residual, LayerNorm's Jacobian is γ ⊙ (centring) / σ,
    so d logits = ε · effect / σ exactly to first order."""
    model = _model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, generator=g) * 3
    d = torch.randn(16, generator=g)
    xc = x - x.mean()
    d = d - d.mean()
    d = d - (d @ xc) / (xc @ xc) * xc  # centred and orthogonal to the centred residual
    W_dec = torch.stack([d, -d, torch.randn(16, generator=g)])
    E = logit_effects_matrix(model, W_dec)
    readout = lambda r: model.unembed(model.ln_final(r[None, None]))[0, 0].double()  # noqa: E731
    eps = 1e-3
    fd = (readout(x + eps * d) - readout(x - eps * d)) / (2 * eps)
    sigma = xc.pow(2).mean().add(model.cfg.eps).sqrt()
    torch.testing.assert_close(fd, (E[0] / sigma).double(), atol=2e-3, rtol=2e-3)
    top = top_effects(E, k=3)
    assert [t for t, _ in top[0]["promoted"]] == [t for t, _ in top[1]["suppressed"]]
    assert top[0]["promoted"][0][1] == pytest.approx(float(E[0].max()), abs=1e-3)
    # in chunks of one feature's row each: the same answer as ranking the whole matrix
    from evolution.interventions.logit_effects import top_logit_effects

    assert top_logit_effects(model, W_dec, k=3, chunk_bytes=4 * E.shape[1]) == top
