"""Per-snapshot evaluation (loss, KL to the unigram / bigram distributions per held-out token) and the
signals read off it, on planted snapshots whose answer is known: models built to track the bigram
distribution exactly at one snapshot and to leave it for a context rule afterwards."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evolution.evaluate.snapshots import evaluate_snapshots, read_eval, token_metrics
from evolution.phases.signals import stops_tracking
from evolution.sources.corpus import Corpus
from evolution.sources.references import (
    bigram_table,
    heldout_entropies,
    ngram_log_probs,
    unigram_log_probs_table,
)

ALPHA = 0.1


def _dense_bigram(train: torch.Tensor, V: int, alpha: float) -> torch.Tensor:
    prev, nxt = train[:, :-1].reshape(-1), train[:, 1:].reshape(-1)
    keep = nxt != 0
    C = torch.zeros(V, V, dtype=torch.float64)
    C.index_put_((prev[keep], nxt[keep]), torch.ones(int(keep.sum()), dtype=torch.float64), accumulate=True)
    return (C + alpha) / (C.sum(1, keepdim=True) + alpha * V)


def test_token_metrics_match_a_dense_computation():
    g = torch.Generator().manual_seed(0)
    V = 13
    train = torch.randint(1, V, (30, 10), generator=g)
    train[:, 0] = 0
    tokens = torch.randint(1, V, (4, 8), generator=g)
    tokens[:, 0] = 0
    logits = torch.randn(4, 8, V, generator=g)
    out = token_metrics(logits, tokens, unigram_log_probs_table(train, V, ALPHA), bigram_table(train, V, ALPHA))
    p = torch.softmax(logits[:, :-1].double(), -1)
    Q2 = _dense_bigram(train, V, ALPHA)[tokens[:, :-1]]
    c1 = torch.bincount(train[:, 1:].reshape(-1), minlength=V).double()
    q1 = (c1 + ALPHA) / (c1.sum() + ALPHA * V)
    assert torch.allclose(out["kl_bigram"], (p * (p.log() - Q2.log())).sum(-1), atol=1e-10)
    assert torch.allclose(out["kl_unigram"], (p * (p.log() - q1.log())).sum(-1), atol=1e-10)
    assert torch.allclose(out["nll"], -p.log().gather(-1, tokens[:, 1:, None])[..., 0], atol=1e-10)


def test_heldout_bigram_reference_is_the_smoothed_cross_entropy():
    g = torch.Generator().manual_seed(1)
    V = 9
    train = torch.randint(1, V, (40, 12), generator=g)
    evals = torch.randint(1, V, (10, 12), generator=g)
    train[:, 0] = evals[:, 0] = 0
    Q = _dense_bigram(train, V, ALPHA)
    direct = -Q[evals[:, :-1], evals[:, 1:]].log().mean().item()
    refs = heldout_entropies(train, evals, ALPHA, V)
    assert refs["heldout_bigram_entropy"] == pytest.approx(direct, rel=1e-12)
    assert refs["heldout_alpha"] == ALPHA
    # held-out, so not the in-sample plug-in: above it on a small train set with unseen pairs
    from evolution.sources.references import bigram_entropy

    assert refs["heldout_bigram_entropy"] > bigram_entropy(train)


# ---------------------------------------------------------------- planted snapshots


class _Planted(torch.nn.Module):
    """log p = (1 − c)·[(1 − b)·uniform + b·bigram] + c·copy-of-the-token-two-back, in logit space."""

    def __init__(self, log_q2: torch.Tensor, b: float, c: float):
        super().__init__()
        self.log_q2, self.b, self.c = log_q2, b, c
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        V = self.log_q2.shape[0]
        uniform = torch.full((*tokens.shape, V), -math.log(V), dtype=torch.float64)
        base = torch.logaddexp(uniform + math.log(max(1 - self.b, 1e-12)), self.log_q2[tokens] + math.log(max(self.b, 1e-12)))
        back2 = torch.roll(tokens, 2, 1)
        copy = torch.full_like(base, -12.0).scatter(-1, back2[..., None], 0.0).log_softmax(-1)
        return ((1 - self.c) * base + self.c * copy).float()


STEPS = [0, 1, 2, 4, 8, 16, 32, 64]
# tracks the bigram distribution more and more until step 8, then moves to a context rule
MIX = [(0.0, 0.0), (0.3, 0.0), (0.6, 0.0), (0.9, 0.0), (1.0, 0.0), (1.0, 0.3), (1.0, 0.6), (1.0, 0.8)]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    from evolution.sources.corpus import CorpusConfig, PlantedConfig, build_corpus

    run = tmp_path_factory.mktemp("run")
    corpus = build_corpus(CorpusConfig(source="planted", seq_len=24, n_train_seqs=256, n_eval_seqs=48, vocab_size=128,
                                       planted=PlantedConfig(n_topics=2, topic_size=8)))
    corpus.save(run)
    V = corpus.vocab_size
    log_q2 = _dense_bigram(corpus.tokens, V, ALPHA).log()
    loaders = [lambda b=b, c=c: _Planted(log_q2, b, c) for b, c in MIX]
    return run, corpus, loaders


def test_planted_snapshots_stop_tracking_bigram_at_the_planted_step(planted_run):
    run, corpus, loaders = planted_run
    summary = evaluate_snapshots(run, STEPS, loaders)
    assert summary["complete"] and summary["steps"] == STEPS and summary["alpha"] == ALPHA
    ev = read_eval(run)
    assert ev["kl_bigram"].shape == (summary["n_tokens"], len(STEPS))
    assert ev["kl_bigram"][:, 4].mean() < 1e-4  # exactly the bigram distribution at step 8
    from evolution.phases.heldout import eval_signals

    sig = eval_signals(ev)
    kl = sig["kl_bigram_stop"]
    assert kl["used"] and kl["step"] == 8 and kl["ci"] == [8, 8] and kl["rise_ci"][0] > 0, kl
    # per planted mechanism: the loss of each labelled mechanism is recorded per snapshot
    assert set(summary["per_snapshot"][0]["loss_by_mechanism"]) <= set(corpus.mechanism_names)
    # ... and the KL to the bigram distribution on each mechanism's tokens, checked against the per-token values
    tok = ev["mechanism"]
    for j, row in enumerate(summary["per_snapshot"]):
        for i, name in enumerate(summary["mechanism_names"]):
            if name in row["kl_bigram_by_mechanism"]:
                want = float(ev["kl_bigram"][tok == i, j].astype("float64").mean())
                assert row["kl_bigram_by_mechanism"][name] == pytest.approx(want, rel=1e-4, abs=1e-6)
    # the uniform snapshot scores log V exactly
    assert summary["per_snapshot"][0]["nll"] == pytest.approx(math.log(corpus.vocab_size), rel=1e-5)


def test_evaluation_resumes_per_snapshot(planted_run, tmp_path):
    run, _, loaders = planted_run
    calls = []

    def counting(i):
        def load():
            calls.append(i)
            return loaders[i]()
        return load

    evaluate_snapshots(run, STEPS, [counting(i) for i in range(len(STEPS))])
    assert calls == []  # everything cached under the same config
    (run / "eval" / "step4.safetensors").unlink()
    evaluate_snapshots(run, STEPS, [counting(i) for i in range(len(STEPS))])
    assert calls == [STEPS.index(4)]


def test_stops_tracking_rule_on_synthetic_curves():
    steps = [0, 10, 20, 50, 100, 200, 500, 1000, 2000]
    rng = np.random.default_rng(0)
    mean = np.array([3.0, 2.0, 1.2, 0.6, 0.4, 0.7, 1.0, 1.2, 1.3])  # minimum at 100, then a rise
    kl = mean[None] + rng.gamma(2.0, 0.2, (300, len(steps))) - 0.4
    out = stops_tracking(kl, steps)
    assert out["used"] and out["step"] == 100 and out["ci"][0] <= 100 <= out["ci"][1]
    flat_after = np.minimum.accumulate(mean)  # falls, then stays: a minimum at the end, no stop
    assert not stops_tracking(flat_after[None] + rng.normal(0, 0.05, (300, len(steps))), steps)["used"]
    tiny_rise = mean.copy()
    tiny_rise[5:] = 0.4 + 1e-4  # the "rise" is within noise
    out = stops_tracking(tiny_rise[None] + rng.normal(0, 0.3, (300, len(steps))), steps)
    assert not out["used"]


def test_corpus_meta_and_loss_figure_use_the_heldout_reference(planted_run):
    run, corpus, _ = planted_run
    meta = json.loads((run / "corpus" / "meta.json").read_text())
    direct = float(-ngram_log_probs(corpus.tokens, corpus.eval_tokens, 2, ALPHA, corpus.vocab_size).nanmean())
    assert meta["heldout_bigram_entropy"] == pytest.approx(direct)
    assert isinstance(Corpus.load(run), Corpus)


def test_tiny_run_phases_carry_the_kl_signal_with_a_ci(tiny_run):
    _, run_dir, records = tiny_run
    assert records["evaluate"]["finished"]
    ph = json.loads((run_dir / "phases.json").read_text())
    kl = ph["signals"]["kl_bigram_stop"]
    assert "ci" in kl and len(kl["ci"]) == 2 and "rule" in kl or "reason" in kl
    assert len(ph["signals"]["loss_below_bigram"].get("ci", [])) in (0, 2)
    curves = ph["kl_curves"]
    assert len(curves["kl_bigram"]["mean"]) == len(curves["steps"]) == len(curves["kl_bigram"]["ci_low"])
    assert "heldout_bigram_entropy" in ph["references"]
