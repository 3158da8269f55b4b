"""Tokenizers for the corpora, all returned as Hugging Face fast tokenizers.

Every tokenizer here uses one special token, "<|endoftext|>", as BOS, EOS and padding, at id 0 for
the ones we build — the convention of Pythia's GPT-NeoX tokenizer (Biderman et al. 2023), so a
snapshot directory saved with it loads in transformers and transformer-lens like a Pythia revision.

- `word_level_tokenizer`: a fixed word list (the planted corpus's pseudo-words), whitespace-split, so
  `decode` gives readable text ("w3 w17 sea4 ...").
- `train_bpe`: a byte-level BPE trained locally with `tokenizers` (the GPT-2/Pythia family of
  tokenizer, minus the hub), lossless on any text.
- `load_pretrained_tokenizer`: Pythia's own (or any) tokenizer by hub name or local directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOT = "<|endoftext|>"


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT
    )


def word_level_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Id 0 is "<|endoftext|>", then `words` in order (ids 1..len(words)); unknown words map to id 0.

    Words must be unique and contain no whitespace. No separate <unk> slot, so the vocabulary size is
    exactly `len(words) + 1`.
    """
    vocab = {EOT: 0}
    for w in words:
        if not w or any(c.isspace() for c in w):
            raise ValueError(f"word-level vocabulary entries must be non-empty without whitespace: {w!r}")
        if w in vocab:
            raise ValueError(f"duplicate word in vocabulary: {w!r}")
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap(tok)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`: "<|endoftext|>" is id 0, the 256 byte symbols follow.

    The result may hold fewer than `vocab_size` entries when the text has too few distinct merges.
    """
    if vocab_size < 257 + 1:
        raise ValueError(
            f"byte-level BPE needs vocab_size >= 258 (256 bytes + <|endoftext|> + merges), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False as in GPT-2/Pythia: "Hello" and " Hello" are different tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() <= 257:
        raise ValueError("BPE training learned no merges: the text is empty or too short")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT)
    return hf


def load_pretrained_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """A fast tokenizer by hub name ("EleutherAI/pythia-70m") or local directory.

    BOS falls back to EOS (Pythia sets both to "<|endoftext|>"), padding to EOS.
    """
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load tokenizer {name_or_path!r} (hub name or local directory): {e}"
        ) from e
    return with_specials(tok, name_or_path)


def with_specials(tok, name: str = "tokenizer") -> PreTrainedTokenizerFast:
    """A copy of fast tokenizer `tok` with BOS, EOS and padding set (each falling back on the other)."""
    import copy

    if not tok.is_fast:
        raise ValueError(f"tokenizer {name!r} is not a fast tokenizer")
    if tok.eos_token is None and tok.bos_token is None:
        raise ValueError(f"tokenizer {name!r} has neither a BOS nor an EOS token to start rows with")
    tok = copy.deepcopy(tok)
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    if tok.eos_token is None:
        tok.eos_token = tok.bos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_hash(tok) -> str:
    """sha256 (first 16 hex digits) of what decides the token ids: the tokenizer's model (vocabulary,
    merges), pre-tokenizer, normalizer and added tokens, read from the fast tokenizer's JSON. Two tokenizers
    with the same hash give the same ids on any text, whichever transformers version saved their files."""
    import hashlib
    import json

    d = json.loads(tok.backend_tokenizer.to_str())
    key = {k: d.get(k) for k in ("model", "pre_tokenizer", "normalizer")}
    key["added_tokens"] = sorted((t["id"], t["content"]) for t in d.get("added_tokens") or [])
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
