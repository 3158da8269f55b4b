"""n-gram entropies and reference losses against hand enumeration and analytic sources."""

import math

import numpy as np
import pytest
import torch

from evolution.sources.references import (
    bigram_entropy,
    cache_log_probs,
    learned_threshold,
    mechanism_references,
    ngram_log_probs,
    unigram_entropy,
)


def _H(p):
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_entropies_hand_enumerated():
    tokens = torch.tensor([[0, 1, 2, 1], [0, 2, 2, 1]])
    # targets 1,2,1 | 2,2,1 -> three 1s, three 2s
    assert unigram_entropy(tokens) == pytest.approx(math.log(2))
    # contexts: 0 -> {1, 2}; 1 -> {2}; 2 -> {1, 2, 1}  (6 pairs)
    expected = 2 / 6 * math.log(2) + 1 / 6 * 0.0 + 3 / 6 * _H([2 / 3, 1 / 3])
    assert bigram_entropy(tokens) == pytest.approx(expected)


def test_bos_is_never_a_target():
    tokens = torch.tensor([[0, 3, 0, 3, 3]])  # a separator (id 0) mid-row, as in packed text
    # targets 3, 3, 3 (the 0 is dropped) -> H = 0
    assert unigram_entropy(tokens) == pytest.approx(0.0)
    # pairs (0,3), (0,3), (3,3): every context determines its target
    assert bigram_entropy(tokens) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no target"):
        unigram_entropy(torch.zeros(2, 4, dtype=torch.long))


def test_unigram_entropy_of_zipf_source():
    rng = np.random.default_rng(0)
    V, a = 60, 1.1
    p = np.arange(1, V + 1) ** -a
    p /= p.sum()
    samples = rng.choice(np.arange(1, V + 1), size=(4000, 64), p=p)
    samples[:, 0] = 0
    est = unigram_entropy(torch.from_numpy(samples))
    assert est == pytest.approx(_H(p), abs=0.01)
    assert abs(est - _H(np.full(V, 1 / V))) > 0.3  # and it is not the uniform entropy


def test_bigram_entropy_of_markov_source():
    rng = np.random.default_rng(1)
    V, T, n = 20, 32, 6000
    P = rng.dirichlet(np.full(V, 0.3), size=V)  # rows: p(next | prev), states 1..V
    # stationary distribution: left eigenvector of P for eigenvalue 1
    w, vecs = np.linalg.eig(P.T)
    pi = np.real(vecs[:, np.argmin(abs(w - 1))])
    pi /= pi.sum()
    x = np.zeros((n, T), dtype=np.int64)
    x[:, 1] = rng.choice(V, size=n, p=pi) + 1
    cum = P.cumsum(1)
    for t in range(2, T):
        u = rng.random(n)
        x[:, t] = (u[:, None] > cum[x[:, t - 1] - 1]).sum(1) + 1
    x[:, 2:] = np.minimum(x[:, 2:], V)
    h_rows = np.array([_H(r) for r in P])
    # (BOS, x1) pairs contribute H(pi); the T-2 chain steps from a stationary start contribute pi·H(P_i).
    expected = (_H(pi) + (T - 2) * float(pi @ h_rows)) / (T - 1)
    assert bigram_entropy(torch.from_numpy(x)) == pytest.approx(expected, abs=0.02)
    assert unigram_entropy(torch.from_numpy(x)) == pytest.approx(_H(pi), abs=0.02)


def test_add_alpha_log_probs_by_hand():
    train = torch.tensor([[0, 1, 1, 2]])  # targets 1, 1, 2; pairs (0,1), (1,1), (1,2)
    evals = torch.tensor([[0, 2, 3]])  # targets 2 | ctx 0, and 3 | ctx 2
    V, a = 4, 1.0
    uni = ngram_log_probs(train, evals, 1, alpha=a, vocab_size=V)
    assert uni[0].tolist() == pytest.approx(
        [math.log((1 + a) / (3 + a * V)), math.log((0 + a) / (3 + a * V))]
    )
    bi = ngram_log_probs(train, evals, 2, alpha=a, vocab_size=V)
    # p(2|0) = (0+1)/(1+4); p(3|2) = (0+1)/(0+4): context 2 never seen as a context
    assert bi[0].tolist() == pytest.approx([math.log(1 / 5), math.log(1 / 4)])


def test_cache_model_by_hand():
    tokens = torch.tensor([[0, 5, 6, 5]])  # unigram counts 5:2, 6:1 -> with α=1, V=8: 3/11, 2/11
    lp = cache_log_probs(tokens, tokens, lam=0.5, alpha=1.0, vocab_size=8)
    expected = [3 / 11, 0.5 * 0 + 0.5 * 2 / 11, 0.5 * 1 / 2 + 0.5 * 3 / 11]  # empty cache -> unigram
    assert lp[0].exp().tolist() == pytest.approx(expected)
    # with λ fitted, repeats in context are worth more than the unigram law says
    g = torch.Generator().manual_seed(0)
    half = torch.randint(1, 50, (64, 6), generator=g)  # each row: 6 random tokens of 49, then again
    rep = torch.cat([torch.zeros(64, 1, dtype=torch.long), half, half], 1)
    fitted = cache_log_probs(rep, rep, alpha=0.1)
    plain = cache_log_probs(rep, rep, lam=0.0, alpha=0.1)
    assert float(fitted.mean()) > float(plain.mean()) + 0.1


def test_mechanism_references_and_threshold():
    train = torch.tensor([[0, 1, 2, 1, 2, 1, 2]] * 10)  # 1 -> 2 always; 2 -> 1 always
    evals = torch.tensor([[0, 1, 2, 3, 1]])
    labels = torch.tensor([[-1, 0, 1, 2, -1]])  # unigram, bigram, copy, (no label)
    refs = mechanism_references(
        train, evals, labels, ("unigram", "bigram", "copy", "topic"), alpha=0.1, vocab_size=4
    )
    assert refs["topic"] == {
        "uniform_model": None,
        "unigram_model": None,
        "bigram_model": None,
        "cache_model": None,
    }
    assert refs["bigram"]["uniform_model"] == pytest.approx(math.log(4))
    # token 2 after 1: bigram model near-certain, unigram model about 1/2
    assert refs["bigram"]["bigram_model"] < 0.05 < math.log(2) - 0.05 < refs["bigram"]["unigram_model"]
    # token 3 (never seen) after 2: both models assign only smoothing mass
    assert refs["copy"]["unigram_model"] == pytest.approx(-math.log(0.1 / (60 + 0.4)))
    # 2 is a context twice per row
    assert refs["copy"]["bigram_model"] == pytest.approx(-math.log(0.1 / (20 + 0.4)))
    # token 3 never appeared in its row either, so the cache model cannot help: the bigram model is lowest
    assert refs["copy"]["cache_model"] > refs["copy"]["bigram_model"]
    # copy tokens here are rare in training, so every n-gram model scores them worse than knowing nothing:
    # the threshold is then the uniform model, log V (a reference worse than it would prove nothing)
    assert refs["copy"]["bigram_model"] > math.log(4)
    assert learned_threshold(refs, "copy") == pytest.approx(math.log(4))
    assert learned_threshold(refs, "bigram") == refs["bigram"]["unigram_model"]
    assert learned_threshold(refs, "unigram") == pytest.approx(math.log(4))
    assert learned_threshold(refs, "topic") is None
