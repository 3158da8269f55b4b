"""The planted corpus: documents whose every token comes from a known mechanism, with its label.

**Planted corpus** (`source="planted"`). One document per row over a synthetic vocabulary of
pseudo-words: "w1".."wN" (base words, numbered by Zipf rank) and topic words ("sea0".."sea15", ...).
Each position is produced by exactly one mechanism, tried in this order, and labelled with it:

1. copy    - inside a copied span: the token repeats the document at a source position, shifted by
             one. Only induction (previous token matched earlier -> predict what followed it; Olsson
             et al. 2022) predicts it. Exception: a copied token whose source was a bigram successor
             follows its (also copied) trigger, so it stays predictable from the previous token and
             keeps the label "bigram".
2. bigram  - after a "trigger" word (a fixed subset of base words), with probability `p_follow`, one
             of its 1..`max_successors` fixed successors: predictable from the previous token alone.
3. copy start - with probability `p_copy` a copied span begins. Its first token is not predictable
             by any mechanism (the model cannot know a copy starts, nor where from), so it is labelled
             **-1** ("no mechanism", like BOS) and kept out of every per-mechanism loss; `copy_source`
             still records where it came from.
4. topic   - with probability `p_topic`, a word of the document's topic (one topic per document,
             words disjoint from the base words): predictable only from the context (earlier topic words).
5. unigram - otherwise an i.i.d. Zipf draw over the base words, p(w_r) ∝ r^-zipf_exponent.

Optional (`n_doc_pairs` > 0): **in-context bigrams** (Bietti et al. 2023, "Birth of a Transformer"). Each
document draws its own (trigger, successor) pairs; at a free position a pair may be emitted. The trigger is
unlabelled (which pair comes is not predictable); its successor is labelled copy when the pair already
occurred in the document, since only induction predicts it. Off by default; the demo recipe turns it on
(3 pairs, p_doc_pair 0.3, rare copied spans), and its 2-layer d=128 model forms the induction circuit at
step ~2,150 of 3,500. With copied spans alone no CPU-sized run we tried formed it.

Optional (`p_number` > 0): **numbers** (Kantamneni & Tegmark 2025's single-token regime). The number
tokens "0".."n_numbers-1", "+" and "=" take vocabulary slots from the base words; at a free position a
number span may start, either a *counting run* "s s+1 s+2 ..." (mod n_numbers; from its third token on
labelled **count**: the run is established, so the next number is known) or a *modular sum*
"a + b = c" with c = (a + b) mod `number_modulus` (only c is labelled, **add**; a, b, "+", "=" are
unlabelled). Counting on a cycle is a cyclic shift, which a linear map implements in the Fourier basis
over a; the sums need the a, b of 4 and 2 positions back (the "Clock" algorithm is one solution).
Off by default; `runs/demo-numbers.toml` turns it on and `evolution.numbers` asks whether a helix forms.

The defaults (vocab 512, seq_len 64) give about 35% unigram, 18% bigram, 27% copy, 15% topic and 3.5%
unlabelled copy-start tokens, generated in ~1-2 s for 4k rows on one core. The aim is that a 2-layer
model shows all four in per-mechanism loss curves: unigram statistics first, then bigram, then
topic/copy (the latter needs an induction circuit, Olsson et al. 2022).

"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

MECHANISMS = ("unigram", "bigram", "copy", "topic")
UNIGRAM, BIGRAM, COPY, TOPIC = range(4)
NUMBER_MECHANISMS = ("count", "add")
COUNT, ADD = 4, 5
NO_MECHANISM = -1
TOPIC_NAMES = ("sea", "sky", "war", "law", "farm", "song", "food", "gold",
               "ice", "fire", "iron", "tree", "star", "bird", "coin", "road")  # fmt: skip


@dataclass
class PlantedConfig:
    """Knobs of the planted generator (see the module docstring for the mechanisms)."""

    zipf_exponent: float = 1.0
    """Exponent a of the unigram law p(w_r) ∝ r^-a over the base words."""
    n_topics: int = 8
    """Number of document topics (0: no topic mechanism)."""
    topic_size: int = 16
    """Words per topic (disjoint from the base words and from other topics)."""
    trigger_mass: float = 0.3
    """Unigram probability mass of the bigram trigger words (picked in random order until reached)."""
    max_successors: int = 3
    """Each trigger has 1..max_successors fixed successors."""
    p_follow: float = 0.9
    """Probability that a trigger is followed by one of its successors."""
    p_copy: float = 0.1
    """Per free position, probability that a copied span starts."""
    copy_min_len: int = 6
    """Shortest copied span (tokens, including its unlabelled first token)."""
    copy_max_len: int = 16
    """Longest copied span."""
    p_topic: float = 0.3
    """Per free position (not bigram, not copy), probability of a topic word."""
    n_doc_pairs: int = 0
    """In-context bigrams (Bietti et al. 2023): each document draws this many (trigger, successor) pairs of
    non-trigger base words; a pair's successor is predictable only by induction, from the pair's earlier
    occurrence in the same document (0: off)."""
    p_doc_pair: float = 0.15
    """Per free position, probability that one of the document's pairs is emitted (trigger, then successor)."""
    p_number: float = 0.0
    """Per free position, probability that a number span (counting run or modular sum) starts (0: off)."""
    n_numbers: int = 100
    """Number tokens "0".."n_numbers-1" (single tokens of the word-level tokenizer)."""
    p_count: float = 0.5
    """Share of number spans that are counting runs; the rest are sums "a + b = c"."""
    count_min_len: int = 4
    """Shortest counting run."""
    count_max_len: int = 8
    """Longest counting run."""
    number_modulus: int = 100
    """Sums: c = (a + b) mod number_modulus (at most n_numbers)."""





@dataclass
class PlantedGrammar:
    """The fixed tables of a planted corpus; a function of (vocab_size, PlantedConfig, seed) only."""

    words: list[str]
    """Token strings for ids 1..vocab_size-1 (id 0 is <|endoftext|>)."""
    base_ids: np.ndarray
    """Ids of the base words, in Zipf-rank order (base_ids[r-1] has rank r)."""
    zipf_probs: np.ndarray
    """Unigram law over `base_ids`."""
    successors: dict[int, tuple[np.ndarray, np.ndarray]]
    """trigger id -> (successor ids, probabilities)."""
    topic_ids: np.ndarray
    """[n_topics, topic_size] ids of each topic's words."""
    number_ids: np.ndarray | None = None
    """Ids of "0".."n_numbers-1", then "+" and "=" (None without numbers)."""


def planted_mechanisms(cfg: PlantedConfig) -> tuple[str, ...]:
    """Mechanism names of a planted corpus: label k is names[k]."""
    return MECHANISMS + NUMBER_MECHANISMS if cfg.p_number > 0 else MECHANISMS


def planted_grammar(vocab_size: int, cfg: PlantedConfig, seed: int) -> PlantedGrammar:
    n_topic_words = cfg.n_topics * cfg.topic_size
    n_number_words = cfg.n_numbers + 2 if cfg.p_number > 0 else 0
    if cfg.p_number > 0 and not (2 <= cfg.number_modulus <= cfg.n_numbers and 3 <= cfg.count_min_len <= cfg.count_max_len):
        raise ValueError(f"numbers need 2 <= number_modulus <= n_numbers and 3 <= count_min_len <= count_max_len, got "
                         f"{cfg.number_modulus}, {cfg.n_numbers}, {cfg.count_min_len}, {cfg.count_max_len}")
    n_base = vocab_size - 1 - n_topic_words - n_number_words
    if n_base < 16:
        raise ValueError(
            f"vocab_size={vocab_size} leaves {n_base} base words after <|endoftext|> and "
            f"{cfg.n_topics}x{cfg.topic_size} topic words and {n_number_words} number words; need at least 16"
        )
    if not 1 <= cfg.copy_min_len <= cfg.copy_max_len:
        raise ValueError(
            f"need 1 <= copy_min_len <= copy_max_len, got {cfg.copy_min_len}, {cfg.copy_max_len}"
        )
    rng = np.random.default_rng([seed, 0])
    base_ids = np.arange(1, n_base + 1)
    zipf = base_ids.astype(np.float64) ** -cfg.zipf_exponent
    topic_ids = (n_base + 1 + np.arange(n_topic_words)).reshape(cfg.n_topics, cfg.topic_size)
    names = [TOPIC_NAMES[k] if k < len(TOPIC_NAMES) else f"topic{k}x" for k in range(cfg.n_topics)]
    words = [f"w{r}" for r in base_ids] + [
        f"{names[k]}{j}" for k in range(cfg.n_topics) for j in range(cfg.topic_size)
    ]
    number_ids = None
    if n_number_words:
        number_ids = n_base + 1 + n_topic_words + np.arange(n_number_words)
        words += [str(i) for i in range(cfg.n_numbers)] + ["+", "="]
    zipf /= zipf.sum()
    # Triggers are added in random order until they hold `trigger_mass` of the unigram law, so the
    # share of bigram tokens does not hinge on whether the seed happens to pick the top-ranked words.
    order = rng.permutation(n_base)
    n_triggers = int(np.searchsorted(np.cumsum(zipf[order]), cfg.trigger_mass)) if cfg.trigger_mass > 0 else 0
    successors = {}
    for trig in sorted(base_ids[order[:n_triggers]].tolist()):
        k = int(rng.integers(1, cfg.max_successors + 1))
        succ = rng.choice(base_ids[base_ids != trig], size=k, replace=False)
        probs = np.sort(rng.dirichlet(np.full(k, 2.0)))[::-1].copy()
        successors[trig] = (succ, probs)
    return PlantedGrammar(words, base_ids, zipf, successors, topic_ids, number_ids)


@dataclass
class PlantedSample:
    tokens: Int[Tensor, "n_seq seq_len"]
    mechanism: Int[Tensor, "n_seq seq_len"]
    copy_source: Int[Tensor, "n_seq seq_len"]
    """Source position of every copied token (and copy start), else -1."""
    topic: Int[Tensor, " n_seq"]
    """Each document's topic (-1 without topics)."""


def generate_planted(
    grammar: PlantedGrammar, cfg: PlantedConfig, n_seqs: int, seq_len: int, rng: np.random.Generator
) -> PlantedSample:
    """Sample `n_seqs` documents of `seq_len` tokens (BOS first), with per-token mechanism labels."""
    T = seq_len
    toks = np.zeros((n_seqs, T), dtype=np.int64)
    labs = np.full((n_seqs, T), NO_MECHANISM, dtype=np.int64)
    srcs = np.full((n_seqs, T), -1, dtype=np.int64)
    topics = np.full(n_seqs, -1, dtype=np.int64)
    trig = {t: (s.tolist(), np.cumsum(p).tolist()) for t, (s, p) in grammar.successors.items()}
    for i in range(n_seqs):
        # Pre-draw every random number of the row in bulk: the loop below is only bookkeeping. All
        # draws are per row, so the first n rows do not depend on how many rows are asked for.
        if cfg.n_topics:
            topics[i] = rng.integers(cfg.n_topics)
        zipf = rng.choice(grammar.base_ids, size=T, p=grammar.zipf_probs).tolist()
        topic_words = (
            grammar.topic_ids[topics[i]][rng.integers(cfg.topic_size, size=T)].tolist()
            if cfg.n_topics
            else None
        )
        u = rng.random((T, 5)).tolist()
        pairs = _doc_pairs(grammar, cfg, rng)
        u_pair = rng.random((T, 2)).tolist() if pairs else None
        u_num = rng.random((T, 4)).tolist() if cfg.p_number > 0 else None  # drawn only when on: old corpora unchanged
        queue: list[tuple[int, int]] = []  # the rest of a number span: (token, label)
        pair_pos: dict[int, int] = {}  # trigger -> position of its successor's last occurrence
        pending = -1  # trigger whose successor is due at this position
        lengths = rng.integers(cfg.copy_min_len, cfg.copy_max_len + 1, size=T).tolist()
        x, lab, src = toks[i], labs[i], srcs[i]
        copy_from, copy_left = -1, 0
        for t in range(1, T):
            u_follow, u_succ, u_copy, u_src, u_topic = u[t]
            prev = int(x[t - 1])
            if queue:
                x[t], lab[t] = queue.pop(0)
                continue
            if pending >= 0:
                # The successor of an in-context pair: induction predicts it once the pair has occurred.
                x[t] = pairs[pending]
                if pending in pair_pos:
                    lab[t], src[t] = COPY, pair_pos[pending]
                pair_pos[pending] = t
                pending = -1
                continue
            if copy_left > 0:
                # A copied (trigger, successor) pair stays predictable from the previous token: bigram.
                x[t], src[t] = x[copy_from], copy_from
                lab[t] = BIGRAM if lab[copy_from] == BIGRAM else COPY
                copy_from, copy_left = copy_from + 1, copy_left - 1
                continue
            if prev in trig and u_follow < cfg.p_follow:
                succ, cum = trig[prev]
                x[t], lab[t] = succ[min(np.searchsorted(cum, u_succ, side="right"), len(succ) - 1)], BIGRAM
                continue
            if u_copy < cfg.p_copy:
                L = min(lengths[t], T - t)
                s = _copy_source(x, t, L, u_src) if L >= cfg.copy_min_len else -1
                if s >= 0:
                    x[t], lab[t], src[t] = x[s], NO_MECHANISM, s
                    copy_from, copy_left = s + 1, L - 1
                    continue
            if u_num is not None and u_num[t][0] < cfg.p_number:
                queue = number_span(grammar, cfg, u_num[t][1:])
                x[t], lab[t] = queue.pop(0)
                continue
            if pairs and t < T - 1 and u_pair[t][0] < cfg.p_doc_pair:
                pending = list(pairs)[min(int(u_pair[t][1] * len(pairs)), len(pairs) - 1)]
                x[t] = pending  # which pair comes next is not predictable: no mechanism
                continue
            if topic_words is not None and u_topic < cfg.p_topic:
                x[t], lab[t] = topic_words[t], TOPIC
            else:
                x[t], lab[t] = zipf[t], UNIGRAM
    return PlantedSample(
        torch.from_numpy(toks), torch.from_numpy(labs), torch.from_numpy(srcs), torch.from_numpy(topics)
    )


def number_references(cfg: PlantedConfig, refs: dict | None) -> dict | None:
    """Add the reference a sum's c must beat: log(number_modulus), the loss of knowing only that c is a number.
    The n-gram models sit just above it (after "=" they spread a little mass over non-numbers), so beating
    them alone is not evidence of addition."""
    if refs and cfg.p_number > 0 and refs.get("add", {}).get("uniform_model") is not None:
        refs["add"]["number_uniform_model"] = math.log(cfg.number_modulus)
    return refs


def number_span(grammar: PlantedGrammar, cfg: PlantedConfig, u: list[float]) -> list[tuple[int, int]]:
    """(token, label) of one number span from three uniforms: a counting run (mod n_numbers), its first two
    tokens unlabelled and the rest COUNT, or a sum "a + b = c", only c labelled (ADD). A span that runs past
    the end of the row is cut there."""
    ids, N = grammar.number_ids, cfg.n_numbers
    plus, eq = int(ids[N]), int(ids[N + 1])
    if u[0] < cfg.p_count:
        n_len = cfg.count_max_len - cfg.count_min_len + 1
        L = cfg.count_min_len + min(int(u[1] * n_len), n_len - 1)
        s = min(int(u[2] * N), N - 1)
        return [(int(ids[(s + i) % N]), NO_MECHANISM if i < 2 else COUNT) for i in range(L)]
    a, b = min(int(u[1] * N), N - 1), min(int(u[2] * N), N - 1)
    c = (a + b) % cfg.number_modulus
    return [(int(ids[a]), NO_MECHANISM), (plus, NO_MECHANISM), (int(ids[b]), NO_MECHANISM), (eq, NO_MECHANISM),
            (int(ids[c]), ADD)]


def _doc_pairs(grammar: PlantedGrammar, cfg: PlantedConfig, rng: np.random.Generator) -> dict[int, int]:
    """This document's in-context bigrams, trigger -> successor: distinct base words that are not global
    bigram triggers, so only the document itself says what follows them."""
    if not cfg.n_doc_pairs:
        return {}
    free = np.array([w for w in grammar.base_ids if int(w) not in grammar.successors])
    words = rng.choice(free, size=2 * cfg.n_doc_pairs, replace=False).tolist()
    return dict(zip(words[::2], words[1::2], strict=True))


def _copy_source(x: np.ndarray, t: int, L: int, u: float) -> int:
    """Start s >= 1 of a source span x[s : s+L] lying before t. Starts whose token occurs once so far are
    preferred, so the first induction step is unambiguous. Returns -1 if the row is too short."""
    starts = np.arange(1, t - L + 1)
    if starts.size == 0:
        return -1
    unique = starts[np.array([(x[1:t] == x[s]).sum() == 1 for s in starts])]
    pool = unique if unique.size else starts
    return int(pool[min(int(u * pool.size), pool.size - 1)])

