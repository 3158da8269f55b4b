"""Layer geometry: linearity against closed-form R², invariances, anisotropy, and a whole run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evolution.geometry.layer_metrics import anisotropy, linearity_fit, linearity_pair, linearity_score
from evolution.geometry.stage import GeometryConfig, collect_resid, geometry, model_geometry, sample_positions


def _r2_with_intercept(X: np.ndarray, Y: np.ndarray) -> float:
    """Independent reference: ordinary least squares of Y on [X, 1] (numpy), R² = 1 − SS_res / SS_tot."""
    Xa = np.hstack([X, np.ones((len(X), 1))])
    coef, *_ = np.linalg.lstsq(Xa, Y, rcond=None)
    res = Y - Xa @ coef
    return 1 - (res**2).sum() / ((Y - Y.mean(0)) ** 2).sum()


def _data(n=500, d=24, seed=0):
    g = np.random.default_rng(seed)
    X = g.normal(size=(n, d)) * g.uniform(0.2, 3, size=d) + g.normal(size=d)
    W = g.normal(size=(d, d)) / np.sqrt(d)
    Y = np.tanh(X @ W) + 0.3 * X + 0.2 * g.normal(size=(n, d)) + 5.0
    return X, Y


def test_linearity_equals_closed_form_r2():
    X, Y = _data()
    ours = linearity_score(torch.tensor(X), torch.tensor(Y))
    assert 0.3 < ours < 0.99  # a genuinely partly nonlinear map
    assert ours == pytest.approx(_r2_with_intercept(X, Y), abs=1e-6)
    # without residual: the same R² with Y − X as the target
    no_res = linearity_score(torch.tensor(X), torch.tensor(Y), residual=False)
    assert no_res == pytest.approx(_r2_with_intercept(X, Y - X), abs=1e-6)
    # normal equations on the centred, normalised matrices, as in the definition
    Xt = (X - X.mean(0)) / np.linalg.norm(X - X.mean(0))
    Yt = (Y - Y.mean(0)) / np.linalg.norm(Y - Y.mean(0))
    A = np.linalg.solve(Xt.T @ Xt, Xt.T @ Yt)
    assert ours == pytest.approx(1 - np.linalg.norm(Xt @ A - Yt) ** 2, abs=1e-6)


def test_float32_inputs_are_fitted_in_float64():
    X, Y = _data(seed=1)
    ref = _r2_with_intercept(X.astype(np.float32).astype(np.float64), Y.astype(np.float32).astype(np.float64))
    assert linearity_score(torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)) == pytest.approx(
        ref, abs=1e-9
    )


def test_linearity_invariances():
    X, Y = _data(seed=2)
    X, Y = torch.tensor(X), torch.tensor(Y)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(X.shape[1], generator=g, dtype=torch.float64), torch.randn(Y.shape[1], generator=g, dtype=torch.float64)
    base = linearity_score(X, Y)
    # with residual: any translation and any scale of either side
    assert linearity_score(3.7 * X + a, 0.02 * Y - 9 * b) == pytest.approx(base, abs=1e-9)
    # without residual: separate translations, and one common scale
    base_nr = linearity_score(X, Y, residual=False)
    assert linearity_score(X + a, Y + b, residual=False) == pytest.approx(base_nr, abs=1e-9)
    assert linearity_score(5 * X, 5 * Y, residual=False) == pytest.approx(base_nr, abs=1e-9)
    # ...but not separate scales: Y − X then points elsewhere (as documented)
    assert abs(linearity_score(5 * X, Y, residual=False) - base_nr) > 1e-3


def test_exact_linear_map_scores_one_and_residual_is_lower():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 16, generator=g, dtype=torch.float64)
    W, c = torch.randn(16, 16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    assert linearity_score(X, X @ W + c) == pytest.approx(1.0, abs=1e-10)
    assert linearity_score(X, X @ W + c, residual=False) == pytest.approx(1.0, abs=1e-10)
    # a residual block: Y = X + small nonlinear update. With residual ≈ 1, without much lower.
    Y = X + 0.2 * torch.relu(X @ W / 4)
    pair = linearity_pair(X, Y)
    assert pair["linearity"] > 0.95 and pair["linearity_no_residual"] < pair["linearity"] - 0.1
    assert pair["linearity"] == pytest.approx(linearity_score(X, Y), abs=1e-12)
    assert pair["linearity_no_residual"] == pytest.approx(linearity_score(X, Y, residual=False), abs=1e-12)


def test_per_token_nonlinearity_finds_the_bent_tokens():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(600, 8, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    bent = torch.arange(0, 600, 60)
    Y[bent] += 4 * torch.randn(len(bent), 8, generator=g, dtype=torch.float64)
    score, per_token = linearity_fit(X, Y)
    assert per_token.mean().item() == pytest.approx(1 - score, abs=1e-12)
    assert set(per_token.topk(len(bent)).indices.tolist()) == set(bent.tolist())


def test_anisotropy():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(800, 10, generator=g, dtype=torch.float64) * torch.linspace(1, 3, 10, dtype=torch.float64) + 7
    Xc = (X - X.mean(0)).numpy()
    eig = np.linalg.eigvalsh(Xc.T @ Xc)
    assert anisotropy(X) == pytest.approx(eig[-1] / eig.sum(), rel=1e-10)
    line = torch.randn(200, 1, generator=g, dtype=torch.float64) * torch.randn(1, 10, generator=g, dtype=torch.float64)
    assert anisotropy(line + 1) == pytest.approx(1.0, abs=1e-10)
    iso = torch.randn(20000, 10, generator=g, dtype=torch.float64)
    assert anisotropy(iso) == pytest.approx(0.1, abs=0.01)


def test_sample_positions():
    pos = sample_positions(10, 8, 30, exclude_bos=True, seed=0)
    assert pos.shape == (30, 2) and (pos[:, 1] >= 1).all() and len({tuple(p) for p in pos.tolist()}) == 30
    assert torch.equal(pos, sample_positions(10, 8, 30, exclude_bos=True, seed=0))
    assert sample_positions(2, 4, 100, exclude_bos=True, seed=0).shape == (6, 2)  # all there are


# ------------------------------------------------------------------ models and runs

VOCAB = 48


def _hf_neox(seed: int, n_layers: int = 2, d_model: int = 32):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=4,
        intermediate_size=4 * d_model, max_position_embeddings=64, rotary_pct=0.25, bos_token_id=0,
        eos_token_id=0, tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(cfg).eval()


def _tokens(n_seq=24, seq_len=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, VOCAB, (n_seq, seq_len), generator=g)
    t[:, 0] = 0
    return t


@pytest.fixture
def run_dir(tmp_path):
    from safetensors.torch import save_file

    from evolution.sources.tokenizer import word_level_tokenizer

    tok = word_level_tokenizer([f"w{i}" for i in range(VOCAB - 1)])
    for step, seed in [(0, 0), (2, 1), (8, 2)]:
        d = tmp_path / "snapshots" / f"step{step}"
        _hf_neox(seed).save_pretrained(d)
        tok.save_pretrained(d)
    (tmp_path / "corpus").mkdir()
    save_file({"tokens": _tokens(seed=1), "eval_tokens": _tokens(seed=2)}, str(tmp_path / "corpus" / "tokens.safetensors"))
    return tmp_path


def test_hf_and_transformer_lens_residual_streams_agree(run_dir):
    """The HF path (forward hooks on the decoder layers) and the TransformerLens path (hook_resid_pre /
    hook_resid_post cache) are independent; on the same weights they must give the same activations."""
    from transformers import GPTNeoXForCausalLM

    from evolution.sources.snapshots import load_local_snapshot

    path = run_dir / "snapshots" / "step2"
    tokens = _tokens(n_seq=5, seq_len=16, seed=3)
    pos = sample_positions(5, 16, 40, exclude_bos=True, seed=1)
    hf, names = collect_resid(GPTNeoXForCausalLM.from_pretrained(path).eval(), tokens, pos, batch_size=2)
    tl, names_tl = collect_resid(load_local_snapshot(path), tokens, pos, batch_size=3)
    assert names == names_tl == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    assert hf.shape == (3, 40, 32)
    assert torch.allclose(hf, tl, atol=1e-4), (hf - tl).abs().max()


def test_geometry_run_writes_json_figures_and_resumes(run_dir):
    cfg = GeometryConfig(n_tokens=300, batch_size=8, mle_k1=5, mle_k2=10)
    data = geometry(run_dir, cfg)
    saved = json.loads((run_dir / "geometry.json").read_text())
    assert saved["steps"] == [0, 2, 8] and saved["layers"] == [0, 1, 2] and saved["complete"]
    for m in ("linearity", "linearity_no_residual", "anisotropy", "id_twonn", "id_mle"):
        vals = saved["metrics"][m]
        assert len(vals) == 3 and all(len(row) == 3 for row in vals), m
    assert all(row[-1] is None for row in saved["metrics"]["linearity"])  # pair metric: no block after L
    assert all(0 < v <= 1 for row in saved["metrics"]["linearity"] for v in row[:-1])
    # the run-level numbers are exactly the per-model function's on the same snapshot and tokens
    from evolution.sources.snapshots import load_local_snapshot

    one = model_geometry(load_local_snapshot(run_dir / "snapshots" / "step8"), _tokens(seed=2), cfg)
    assert one["metrics"]["linearity"] == pytest.approx(saved["metrics"]["linearity"][2], abs=1e-9)
    assert data["metrics"]["id_twonn"] == saved["metrics"]["id_twonn"]
    for m in ("linearity", "linearity_no_residual", "anisotropy", "id_twonn", "id_mle"):
        assert (run_dir / "figures" / f"geometry_{m}.png").stat().st_size > 1000
    # resume: a finished file is reused (no snapshot is loaded: the snapshot dirs can even be gone)
    import shutil

    shutil.rmtree(run_dir / "snapshots" / "step2")
    again = geometry(run_dir, GeometryConfig(n_tokens=300, batch_size=8, mle_k1=5, mle_k2=10, steps=[0, 2, 8]))
    assert again["metrics"] == saved["metrics"]


def test_shared_factorisations_give_each_metric_its_own_answer():
    # linearity_pair and the resamples get the anisotropy and both held-out scores from shared SVDs; each
    # must equal the metric computed on its own (anisotropy's svdvals of the raw centred X, one lstsq per target)
    from evolution.geometry.layer_metrics import linearity_and_anisotropy, linearity_heldout

    g = torch.Generator().manual_seed(7)
    X = torch.randn(500, 24, generator=g) * torch.linspace(0.1, 3, 24)
    Y = X + 0.3 * torch.tanh(X @ torch.randn(24, 24, generator=g))
    pair = linearity_pair(X, Y, seed=5)
    assert pair["anisotropy"] == pytest.approx(anisotropy(X), rel=1e-10)
    assert pair["linearity_heldout"] == pytest.approx(linearity_heldout(X, Y, True, seed=5), abs=1e-12)
    assert pair["linearity_no_residual_heldout"] == pytest.approx(linearity_heldout(X, Y, False, seed=5), abs=1e-12)
    lin, an = linearity_and_anisotropy(X, Y, residual=False)
    assert lin == pytest.approx(linearity_score(X, Y, residual=False), abs=1e-12)
    assert an == pytest.approx(anisotropy(X), rel=1e-10)
