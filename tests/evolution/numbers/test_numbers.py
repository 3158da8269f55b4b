"""The number helix (evolution.numbers): recovery on planted helices, nulls on random embeddings, the
planted number mechanism's ground truth, number-token activations, and the stage across snapshots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evolution.numbers.helix import (
    HelixConfig,
    cv_r2,
    emergence_step,
    fit_helix,
    fourier_spectrum,
    helix_basis,
    period_strength,
)

A = torch.arange(100, dtype=torch.float64)


def planted_helix(periods, noise: float, d: int = 64, seed: int = 0):
    """Activations = standardized helix basis of `periods` through a random linear map into d dims + noise."""
    g = torch.Generator().manual_seed(seed)
    B = helix_basis(A, periods)
    B = (B - B.mean(0)) / B.std(0)
    W = torch.randn(B.shape[1], d, generator=g, dtype=torch.float64)
    signal = B @ W
    return signal + noise * torch.randn(len(A), d, generator=g, dtype=torch.float64), signal


def test_planted_helix_recovers_its_periods_and_r2():
    X, signal = planted_helix([5, 10, 100], noise=0.5)
    fit = fit_helix(X, A, HelixConfig(n_null=50, n_random_periods=10))
    # R² of the true model: the signal's share of the variance (held-out fits lose a little to 9 + 1 fitted params)
    centred = X - X.mean(0)
    expected = 1 - float(((X - signal - (X - signal).mean(0)) ** 2).sum() / (centred**2).sum())
    assert expected - 0.03 < fit.helix_r2 <= expected + 0.01
    assert fit.helix_above_null and fit.helix_r2 > fit.shuffled_r2_null + 0.5
    assert fit.helix_r2 > fit.linear_r2 + 0.3 and fit.helix_r2 > fit.random_periods_r2_q95 + 0.3
    for T in ("5", "10", "100"):
        assert fit.strength[T] > 3 * fit.strength_null[T], T
    assert fit.strength["2"] < fit.strength_null["2"]  # a period that is not there stays under its null
    top3 = sorted(np.argsort(fit.spectrum)[-3:])
    assert sorted(fit.spectrum_periods[i] for i in top3) == [5.0, 10.0, 100.0]


def test_random_embedding_does_not_beat_the_baselines():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(100, 64, generator=g, dtype=torch.float64)
    fit = fit_helix(X, A, HelixConfig(n_null=50, n_random_periods=10))
    assert not fit.helix_above_null
    assert fit.helix_r2 < fit.pca_r2 and fit.helix_r2 < 0.05
    assert not any(fit.strength[k] > fit.strength_null[k] for k in fit.strength)


def test_period_strength_equals_the_dft_share_for_periods_dividing_n():
    """Regression on cos/sin (time domain) and the DFT power (frequency domain) are two routes to one number."""
    X, _ = planted_helix([2, 5, 10, 100], noise=1.0, d=16, seed=3)
    periods, share = fourier_spectrum(X, A)
    for T in (100, 50, 20, 10, 5, 4, 2):
        assert period_strength(X, A, T) == pytest.approx(share[periods.index(float(T))], rel=1e-9, abs=1e-12)
    assert sum(share) <= 1 + 1e-9


def test_linear_only_fit_is_exact_on_a_line():
    X = A[:, None] * torch.randn(1, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert cv_r2(X, A, []) == pytest.approx(1.0, abs=1e-9)


def test_emergence_step_needs_the_value_to_stay_above_its_null():
    steps = [0, 10, 20, 30, 40]
    assert emergence_step(steps, [0, 1, 0, 1, 1], [0.5] * 5) == 30  # the blip at 10 does not count
    assert emergence_step(steps, [1, 1, 1, 1, 1], [0.5] * 5) == 0
    assert emergence_step(steps, [1, 1, 1, 1, 0], [0.5] * 5) is None


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        fit_helix(torch.randn(5, 4), torch.arange(5.0))
    with pytest.raises(ValueError, match="contiguous"):
        fourier_spectrum(torch.randn(4, 3), torch.tensor([0.0, 1, 2, 5]))


# ------------------------------------------------------------------ planted number mechanism


def _numbers_corpus(**kw):
    from evolution.sources.corpus import CorpusConfig, PlantedConfig, build_corpus

    planted = PlantedConfig(p_number=0.2, n_numbers=30, number_modulus=30, **kw)
    return build_corpus(CorpusConfig(vocab_size=256, seq_len=48, n_train_seqs=200, n_eval_seqs=20, planted=planted))


def test_planted_number_spans_follow_their_rules():
    from evolution.sources.planted import ADD, COUNT

    c = _numbers_corpus()
    assert c.mechanism_names[-2:] == ("count", "add")
    words = c.tokenizer.convert_ids_to_tokens(c.tokens.flatten().tolist())
    val = np.array([int(w) if w.isdigit() else -1 for w in words]).reshape(c.tokens.shape)
    mech = c.mechanism.numpy()
    rows, cols = np.nonzero(mech == ADD)
    assert len(rows) > 50
    assert all(words[r * 48 + t - 1] == "=" and words[r * 48 + t - 3] == "+" for r, t in zip(rows, cols, strict=True))
    assert (val[rows, cols] == (val[rows, cols - 4] + val[rows, cols - 2]) % 30).all()
    rows, cols = np.nonzero(mech == COUNT)
    assert len(rows) > 50
    assert (val[rows, cols] == (val[rows, cols - 1] + 1) % 30).all()
    assert (val[rows, cols - 1] == (val[rows, cols - 2] + 1) % 30).all()
    refs = c.meta()["mechanism_references"]
    assert refs["add"]["bigram_model"] > math.log(30) - 0.5  # no counter predicts a sum
    from evolution.sources.references import learned_threshold

    assert learned_threshold(refs, "add") == pytest.approx(math.log(30))  # knowing "a number comes" is not addition


def test_number_mechanism_off_leaves_the_corpus_unchanged():
    from evolution.sources.corpus import CorpusConfig, PlantedConfig, build_corpus

    base = build_corpus(CorpusConfig(n_train_seqs=20, n_eval_seqs=4))
    off = build_corpus(CorpusConfig(n_train_seqs=20, n_eval_seqs=4, planted=PlantedConfig(n_numbers=7, p_count=0.9)))
    assert torch.equal(base.tokens, off.tokens) and off.mechanism_names == ("unigram", "bigram", "copy", "topic")


# ------------------------------------------------------------------ activations of number tokens


def test_number_prompts_single_token_and_digit_splitting_tokenizers():
    from evolution.numbers.acts import NumberTokenError, default_templates, number_prompts
    from evolution.sources.tokenizer import train_bpe

    c = _numbers_corpus()
    tpls = default_templates(c.tokenizer)
    prompts = number_prompts(c.tokenizer, range(30), tpls)
    assert len(prompts) == 30 * len(tpls)
    for i, _, ids, pos in prompts:
        assert len(pos) == 1 and c.tokenizer.convert_ids_to_tokens(ids[pos[0]]) == str(i)
    with pytest.raises(NumberTokenError, match="no token for the number 30"):
        number_prompts(c.tokenizer, [30], tpls)
    bpe = train_bpe(["the cat sat on the mat " * 50 + "0 1 2 3 4 5 6 7 8 9 "], 270)
    with pytest.raises(NumberTokenError, match="splits 42 into 2 tokens"):
        number_prompts(bpe, [42], ["x={a}"])
    (_, _, ids, pos), = number_prompts(bpe, [42], ["x={a}"], pool="mean")
    assert bpe.decode([ids[p] for p in pos]) == "42"


def test_number_acts_match_a_direct_forward_pass():
    """The batched, pooled, template-averaged activations equal run_with_cache on each prompt alone."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from evolution.numbers.acts import number_acts

    c = _numbers_corpus()
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
                                                      n_ctx=16, d_vocab=c.vocab_size, act_fn="gelu"))
    tpls = ["{a}", "w1 w2 {a}"]
    acts, hooks = number_acts(model, c.tokenizer, [3, 17], tpls, batch_size=1)
    assert hooks == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    for i, a in enumerate([3, 17]):
        ref = 0
        for t in tpls:
            ids = [0, *c.tokenizer(t.replace("{a}", str(a)), add_special_tokens=False)["input_ids"]]
            _, cache = model.run_with_cache(torch.tensor([ids]))
            ref = ref + cache["blocks.1.hook_resid_pre"][0, -1] / len(tpls)
        torch.testing.assert_close(acts[1, i], ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the stage across snapshots


def test_numbers_stage_on_the_tiny_numbers_run(tiny_numbers_run):
    from evolution.numbers.stage import numbers_on
    from evolution.recipe import load_recipe

    cfg, run = tiny_numbers_run
    data = json.loads((run / "numbers.json").read_text())
    n_steps, n_layers = len(data["steps"]), len(data["hooks"])
    assert data["complete"] and n_layers == 3 and n_steps >= 4
    assert np.array(data["helix_r2"]).shape == (n_steps, n_layers)
    assert set(data["strength"]) == {"2", "5", "10", "20"} and set(data["learned_steps"]) == {"count", "add"}
    assert len(data["spectrum"][0][0]) == 10 and set(data["emergence"]["periods"]) == set(data["strength"])
    assert (run / "figures" / "numbers.png").stat().st_size > 10_000
    assert "Number representations" in (run / "report.html").read_text()
    tiny = load_recipe(Path(__file__).parents[2] / "data" / "tiny.toml")
    assert numbers_on(cfg) and not numbers_on(tiny)  # off by default, on with the number mechanism
    demo = load_recipe(Path(__file__).parents[3] / "runs" / "demo-numbers.toml")
    assert numbers_on(demo) and demo.corpus.planted.p_number > 0

    from evolution import load_run

    table = load_run(run).numbers_table()
    assert list(table["step"]) == data["steps"] and "T20_null" in table


def test_numbers_stage_resumes_without_refitting(tiny_numbers_run, tmp_path, monkeypatch):
    import shutil

    from evolution.context import RunContext
    from evolution.numbers import stage

    cfg, run = tiny_numbers_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = json.loads((copy / "numbers.json").read_text())
    ctx = RunContext(cfg)
    steps = ctx.steps
    monkeypatch.setattr(stage, "model_numbers", lambda *a: pytest.fail("a finished step was fitted again"))
    after = stage.numbers(copy, cfg.numbers, steps, ctx.loaders())
    assert after["helix_r2"] == before["helix_r2"]


def test_units_digit_lookup_explains_a_mod_10_code_and_not_a_line():
    from evolution.numbers.helix import units_digit_r2

    g = torch.Generator().manual_seed(2)
    table = torch.randn(10, 32, generator=g, dtype=torch.float64)
    X = table[(A % 10).long()] + 0.1 * torch.randn(100, 32, generator=g, dtype=torch.float64)
    assert units_digit_r2(X, A) > 0.95
    line = A[:, None] * torch.randn(1, 32, generator=g, dtype=torch.float64)
    assert units_digit_r2(line, A) < 0.05
