"""One snapshot source for every stage: `(step, model)` pairs, one model in memory at a time.

`SnapshotSource(source, steps, run_dir=...)` serves the three kinds of `[snapshots] source`:

- `"pretrain"`: the run's own mini-Pythia, `RUN/snapshots/step{N}/`;
- `"local:<dir>"`: a directory of `step{N}/` Hugging Face checkpoints (the layout of Pythia's hub
  revisions), each with config.json, weights and tokenizer files (or the tokenizer files once in `<dir>`);
- `"hf:<repo>"`: a hub model's training revisions through transformer-lens `checkpoint_value`
  (Pythia: revisions `step{N}`; `stanford-crfm/*` GPT-2: `checkpoint-{N}`).

Before any model runs, `check()` reads every snapshot's config.json and tokenizer files (no weights)
and requires one identity across them, `IDENTITY_KEYS`: family, d_model, n_layers, vocabulary size and
the tokenizer hash (`sources.tokenizer.tokenizer_hash`); `check_tokens` requires the token stream to be
made by that tokenizer and to fit the embedding. A disagreement is a `SnapshotError` naming both sides.

Families (local directories; `sources.snapshots.FAMILIES`), each loaded through transformer-lens 3.9 and
tested against Hugging Face's own forward pass in tests/evolution/sources/test_snapshot_source.py: GPT-NeoX (Pythia),
GPT-2, Llama-style (RMSNorm, gated MLP, rotary, grouped-query attention). Hub: Pythia (tested on a
hub-shaped offline cache); other transformer-lens models with checkpoints go through the same call,
untested here. Anything else is refused with the list of supported families.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from evolution.sources.snapshots import (
    FAMILIES,
    GE2025_STEPS,
    PYTHIA_STEPS,
    SnapshotError,
    _read_neox_config,
    load_local_snapshot,
    load_pythia_snapshot,
    local_steps,
)
from evolution.sources.tokenizer import tokenizer_hash


@dataclass
class SnapshotsConfig:
    """Where the snapshots come from and which of them the study uses."""

    source: str = "pretrain"
    """"pretrain" (train a mini-Pythia in this run), "local:<dir>" (a directory of step{N} HF checkpoints:
    GPT-NeoX, GPT-2 or Llama-style), or "hf:EleutherAI/pythia-70m" (Pythia's checkpoints from the hub, through
    transformer-lens). Every stage reads them through evolution.sources.snapshot_source.SnapshotSource."""
    steps: list[int] | None = None
    """Steps to use (None: every saved step; for the hub, Ge et al. 2025's 32 steps)."""
    cache_dir: str | None = None
    """hf: sources: the Hugging Face hub cache to read revisions from (None: the default, HF_HUB_CACHE)."""
    local_files_only: bool = False
    """hf: sources: use only revisions already in the cache (offline), never the network."""



IDENTITY_KEYS = ("architecture", "d_model", "n_layers", "vocab_size", "tokenizer_hash")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class Identity:
    """What must agree across snapshots (and with the token stream), read from config and tokenizer files."""

    architecture: str
    d_model: int
    n_layers: int
    vocab_size: int
    """Rows of the embedding (config.json; Pythia pads it beyond the tokenizer)."""
    tokenizer_hash: str
    tokenizer_vocab: int
    """Entries of the tokenizer (≤ vocab_size)."""

    def describe(self) -> str:
        return (f"{self.architecture}, d_model {self.d_model}, {self.n_layers} layers, vocab {self.vocab_size}, "
                f"tokenizer {self.tokenizer_hash} ({self.tokenizer_vocab} tokens)")


def config_shape(cfg: dict) -> tuple[str, int, int, int]:
    """(model_type, d_model, n_layers, vocab_size) from a Hugging Face config.json (GPT-2 names differ)."""
    d = cfg.get("hidden_size", cfg.get("n_embd"))
    n = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    return str(cfg.get("model_type")), int(d or 0), int(n or 0), int(cfg.get("vocab_size") or 0)


def parse_source(source: str) -> tuple[str, str]:
    """("pretrain" | "local" | "hf", the directory or repo)."""
    if source == "pretrain":
        return "pretrain", ""
    for kind in ("local", "hf"):
        if source.startswith(f"{kind}:") and source[len(kind) + 1:]:
            return kind, source[len(kind) + 1:]
    raise SnapshotError(f"snapshots.source {source!r}: expected 'pretrain', 'local:<dir of step{{N}} checkpoints>' "
                        "or 'hf:<hub repo>' (e.g. hf:EleutherAI/pythia-160m)")


def hub_revision(repo: str, step: int) -> str:
    """The hub revision holding `repo`'s checkpoint at `step` (Pythia: step{N}; stanford-crfm: checkpoint-{N})."""
    return f"checkpoint-{step}" if repo.startswith("stanford-crfm/") else f"step{step}"


class SnapshotSource:
    """The snapshots of a run (see the module docstring). `steps=None`: every local step, or for the hub
    Ge et al. 2025's 32 Pythia steps. Hub options: `cache_dir`, `local_files_only` (offline)."""

    def __init__(self, source: str = "pretrain", steps: list[int] | None = None, *, run_dir: str | Path | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, cache_dir: str | None = None,
                 local_files_only: bool = False):
        self.source = source
        self.kind, self.spec = parse_source(source)
        if self.kind == "pretrain" and run_dir is None:
            raise ValueError("a 'pretrain' snapshot source needs run_dir")
        self.root = (Path(run_dir) / "snapshots" if self.kind == "pretrain"
                     else Path(self.spec).expanduser().resolve() if self.kind == "local" else None)
        self.requested = None if steps is None else sorted(int(s) for s in steps)
        self.device, self.dtype = device, dtype
        self.hub_kwargs = {k: v for k, v in (("cache_dir", cache_dir), ("local_files_only", local_files_only)) if v}
        self._identities: dict[int, Identity] = {}
        self._tokenizers: dict[str, object] = {}

    @classmethod
    def for_run(cls, run_dir: str | Path, steps: list[int] | None = None, device: str = "cpu") -> SnapshotSource:
        """The source a run was made with (its run.json's [snapshots] table); a run directory without
        run.json is taken to hold its own snapshots (`pretrain`)."""
        run = Path(run_dir)
        snaps = {}
        if (run / "run.json").exists():
            snaps = json.loads((run / "run.json").read_text()).get("snapshots") or {}
        return cls(snaps.get("source", "pretrain"), steps if steps is not None else snaps.get("steps"), run_dir=run,
                   device=device, cache_dir=snaps.get("cache_dir"), local_files_only=bool(snaps.get("local_files_only")))

    def with_steps(self, steps: list[int]) -> SnapshotSource:
        """The same source restricted to `steps` (identities already read are kept)."""
        other = copy.copy(self)
        other.requested = sorted(int(s) for s in steps)
        other.__dict__.pop("steps", None)
        return other

    def __repr__(self) -> str:
        return f"SnapshotSource({self.source!r}, steps={self.requested})"

    # ------------------------------------------------------------------------------- which steps

    @cached_property
    def steps(self) -> list[int]:
        """The steps used, sorted; missing ones are an error before anything loads."""
        if self.kind == "hf":
            wanted = self.requested or list(GE2025_STEPS)
            if self.spec.startswith("EleutherAI/pythia") and (bad := [s for s in wanted if s not in PYTHIA_STEPS]):
                raise SnapshotError(f"{self.spec}: steps {bad} are not Pythia checkpoints (0, 1, 2, 4, ..., 512, "
                                    "1000..143000 every 1000; see PYTHIA_STEPS)")
            return wanted
        available = local_steps(self.root)
        if not available:
            hint = " (run the pretrain stage first)" if self.kind == "pretrain" else ""
            raise SnapshotError(f"no step{{N}} checkpoint directories (with config.json) under {self.root}{hint}")
        if self.requested is None:
            return available
        if missing := [s for s in self.requested if s not in available]:
            raise SnapshotError(f"snapshot step(s) {missing} not found under {self.root}; available: {available}")
        return self.requested

    def location(self, step: int) -> str:
        return f"{self.spec}@{hub_revision(self.spec, step)}" if self.kind == "hf" else str(self.root / f"step{step}")

    # ------------------------------------------------------------------------------- files, no weights

    def _hub_kwargs(self) -> dict:
        return dict(self.hub_kwargs)

    def _config(self, step: int) -> dict:
        if self.kind != "hf":
            return _read_neox_config(self.root / f"step{step}")
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(self.spec, "config.json", revision=hub_revision(self.spec, step), **self._hub_kwargs())
        except Exception as e:  # noqa: BLE001 (offline: LocalEntryNotFoundError; online: RevisionNotFoundError, ...)
            where = f"the hub cache {self.hub_kwargs.get('cache_dir') or '(default)'}" if self.hub_kwargs.get(
                "local_files_only") else "the hub or its cache"
            raise SnapshotError(f"{self.location(step)}: config.json not found in {where} "
                                f"({type(e).__name__}); is {hub_revision(self.spec, step)} a revision of {self.spec}?") from e
        return json.loads(Path(path).read_text())

    def _tokenizer_dir(self, step: int) -> Path:
        d = self.root / f"step{step}"
        for cand in (d, self.root):
            if any((cand / f).exists() for f in _TOKENIZER_FILES):
                return cand
        raise SnapshotError(f"step{step} ({d}) holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}), nor does "
                            f"{self.root}: put the tokenizer the checkpoints were trained with in either, so the "
                            "corpus is tokenized with it")

    def _load_tokenizer(self, step: int):
        from transformers import AutoTokenizer

        if self.kind == "hf":
            key = hub_revision(self.spec, step)
            if key not in self._tokenizers:
                try:
                    self._tokenizers[key] = AutoTokenizer.from_pretrained(
                        self.spec, revision=key, add_bos_token=True, **self._hub_kwargs())
                except (OSError, ValueError) as e:
                    raise SnapshotError(f"{self.location(step)}: no tokenizer ({e})") from e
            return self._tokenizers[key]
        d = self._tokenizer_dir(step)
        if str(d) not in self._tokenizers:
            # add_bos_token=True: transformer-lens otherwise re-loads the tokenizer by name to set it
            self._tokenizers[str(d)] = AutoTokenizer.from_pretrained(str(d), add_bos_token=True)
        return self._tokenizers[str(d)]

    def tokenizer(self, step: int | None = None):
        """The snapshots' tokenizer (of `step`, default the last step; `check()` makes them all one)."""
        return self._load_tokenizer(self.steps[-1] if step is None else step)

    def identity(self, step: int) -> Identity:
        if step not in self._identities:
            arch, d, n, v = config_shape(self._config(step))
            tok = self._load_tokenizer(step)
            self._identities[step] = Identity(arch, d, n, v, tokenizer_hash(tok), len(tok))
        return self._identities[step]

    def check(self) -> Identity:
        """Every snapshot's identity (config and tokenizer files only), required to be one; returns it."""
        first = self.steps[0]
        ref = self.identity(first)
        for s in self.steps[1:]:
            got = self.identity(s)
            if bad := [k for k in IDENTITY_KEYS if getattr(got, k) != getattr(ref, k)]:
                sides = "; ".join(f"{k}: {getattr(ref, k)} vs {getattr(got, k)}" for k in bad)
                raise SnapshotError(f"snapshots disagree, so no crosscoder can span them: step{first} ({self.location(first)}) "
                                    f"is {ref.describe()}, step{s} ({self.location(s)}) is {got.describe()} [{sides}]")
        if ref.tokenizer_vocab > ref.vocab_size:
            raise SnapshotError(f"step{first} ({self.location(first)}): its tokenizer has {ref.tokenizer_vocab} tokens, "
                                f"more than the model's vocabulary of {ref.vocab_size}")
        return ref

    def check_tokens(self, tokenizer, max_token_id: int, where: str = "the corpus") -> Identity:
        """The token stream must come from the snapshots' tokenizer and fit their embedding (before any model runs)."""
        ref = self.check()
        h = tokenizer_hash(tokenizer)
        if h != ref.tokenizer_hash:
            raise SnapshotError(
                f"{where} was tokenized by tokenizer {h} ({len(tokenizer)} tokens), but the snapshots of {self.source} "
                f"use tokenizer {ref.tokenizer_hash} ({ref.tokenizer_vocab} tokens, {self.location(self.steps[0])}); "
                "rebuild the corpus with the snapshots' tokenizer (leave [corpus] tokenizer unset)")
        if max_token_id >= ref.vocab_size:
            raise SnapshotError(f"{where} holds token id {max_token_id}, beyond the snapshots' vocabulary of "
                                f"{ref.vocab_size} ({self.location(self.steps[0])})")
        return ref

    def check_corpus(self, corpus) -> Identity:
        """`check_tokens` on a `Corpus` (train and held-out rows)."""
        top = max(int(corpus.tokens.max()), int(corpus.eval_tokens.max()))
        return self.check_tokens(corpus.tokenizer, top, "the corpus")

    def describe(self) -> dict:
        """The source and its identity, for manifests and reports."""
        return {"source": self.source, "steps": self.steps, **asdict(self.check())}

    # ------------------------------------------------------------------------------- models

    def load(self, step: int, device: str | None = None):
        """Step `step`'s model as a `HookedTransformer` (unprocessed weights, see sources.snapshots)."""
        device = device or self.device
        tok = self.tokenizer(step)
        if self.kind != "hf":
            return load_local_snapshot(self.root / f"step{step}", device, self.dtype, tokenizer=tok)
        if self.spec.startswith("EleutherAI/pythia"):
            return load_pythia_snapshot(self.spec, step, device, dtype=self.dtype, tokenizer=tok, **self._hub_kwargs())
        from transformer_lens import HookedTransformer

        from evolution.sources.snapshots import _processing

        return HookedTransformer.from_pretrained(self.spec, checkpoint_value=step, tokenizer=tok, device=device,
                                                 dtype=self.dtype, **_processing(False), **self._hub_kwargs()).eval()

    def iter(self, steps: list[int] | None = None, device: str | None = None) -> Iterator[tuple[int, object]]:
        """`(step, model)` in step order, one model alive at a time (the caller drops it before the next)."""
        for s in self.with_steps(steps).steps if steps is not None else self.steps:
            yield s, self.load(s, device)

    def __iter__(self) -> Iterator[tuple[int, object]]:
        return self.iter()

    def loaders(self, steps: list[int] | None = None, device: str | None = None) -> list[Callable[[], object]]:
        """One zero-argument loader per step (what `crosscoders.harvest` and the evaluate stage take)."""
        steps = self.steps if steps is None else steps
        return [lambda s=s: self.load(s, device) for s in steps]


__all__ = ["FAMILIES", "IDENTITY_KEYS", "Identity", "SnapshotError", "SnapshotSource", "hub_revision", "parse_source"]
