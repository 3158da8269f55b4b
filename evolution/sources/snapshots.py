"""Snapshot sources: checkpoint schedules and loaders that turn a checkpoint into a `HookedTransformer`.

A snapshot `step{N}` is the model's weights after N optimiser steps. Local snapshots are Hugging Face
GPT-NeoX directories `snapshots/step{N}/` (config.json, model.safetensors, tokenizer files), the same
shape as Pythia's hub revisions `step{N}` (Biderman et al. 2023), so one conversion serves both.

Weight processing. By default the loaders do *no* TransformerLens weight processing (no LayerNorm
folding, no centring of writing weights or the unembedding): `blocks.{L}.hook_resid_post` then equals
the Hugging Face model's hidden state, which is what a crosscoder across snapshots should see. Log-probs
are identical either way; pass `process_weights=True` for TransformerLens's usual simplified form.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from crosscoders.errors import UserError
from crosscoders.progress import quiet_library_bars

if TYPE_CHECKING:  # transformer-lens costs ~2.6 s to import: loaded where a snapshot is (CLI --help stays quick)
    from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)

# Pythia's 154 checkpoints: log-spaced 0, 1, 2, 4, ..., 512, then every 1000 steps to 143000.
PYTHIA_STEPS: tuple[int, ...] = (0,) + tuple(2**i for i in range(10)) + tuple(range(1000, 143001, 1000))
assert len(PYTHIA_STEPS) == 154, len(PYTHIA_STEPS)

# The 32 snapshots of Pythia-160M that Ge et al. 2025 (arXiv 2509.17196) train their crosscoder on.
GE2025_STEPS: tuple[int, ...] = (
    (0,) + tuple(2**i for i in range(1, 10)) + tuple(range(1000, 10001, 1000))
    + (14000, 20000, 27000, 34000, 47000, 60000, 74000, 87000, 100000, 114000, 127000, 143000)
)
assert len(GE2025_STEPS) == 32 and set(GE2025_STEPS) <= set(PYTHIA_STEPS)

_STEP_DIR = re.compile(r"^step(\d+)$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class SnapshotError(UserError, ValueError):
    """A snapshot is missing, is of an unsupported family, or disagrees with its siblings or the corpus."""


def pythia_like_schedule(max_step: int, n_linear: int = 12) -> list[int]:
    """Pythia's schedule scaled to `max_step`: 0 and powers of two below the first linear step, then
    `n_linear` evenly spaced steps ending at `max_step` (Pythia: 0..512, then 1000..143000 by 1000).

    The log-spaced head matters: the statistical phase (loss falling toward unigram/bigram entropy)
    happens in the first ~1% of training, and evenly spaced snapshots would miss it."""
    if max_step < 0 or n_linear < 1:
        raise ValueError(f"need max_step >= 0 and n_linear >= 1, got {max_step}, {n_linear}")
    if max_step == 0:
        return [0]
    linear = {max(1, round(max_step * k / n_linear)) for k in range(1, n_linear + 1)}
    first = min(linear)
    log = {0} | {2**i for i in range(max_step.bit_length()) if 2**i < first}
    return sorted(log | linear)


def local_steps(snapshot_root: str | Path) -> list[int]:
    """Sorted steps of the complete `step{N}` directories under `snapshot_root` (temp dirs ignored)."""
    root = Path(snapshot_root)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "config.json").exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


# Hugging Face model_type -> the causal-LM class transformer-lens 3.9 converts (loading_from_pretrained), for
# the families loaded and tested here (tests/evolution/sources/test_snapshot_source.py); other architectures are refused.
FAMILIES: dict[str, str] = {"gpt_neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _read_neox_config(path: Path) -> dict:
    """config.json of a local checkpoint of a supported family (FAMILIES), else a SnapshotError saying why."""
    cfg_file = path / "config.json"
    if not path.is_dir():
        available = local_steps(path.parent)
        hint = f"; steps available in {path.parent}: {available}" if available else ""
        raise SnapshotError(f"snapshot directory {path} does not exist{hint}")
    if not cfg_file.exists():
        raise SnapshotError(f"{path} is not a Hugging Face model directory: no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{cfg_file} is not valid JSON: {e}") from e
    archs = cfg.get("architectures") or []
    family = FAMILIES.get(cfg.get("model_type"))
    if family is None or (archs and family not in archs):
        raise SnapshotError(
            f"{path} is not a checkpoint of a supported family (model_type={cfg.get('model_type')!r}, "
            f"architectures={archs}); supported: {', '.join(f'{k} ({v})' for k, v in FAMILIES.items())}"
        )
    return cfg


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise SnapshotError(f"{path} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}); pass tokenizer=")
    # add_bos_token=True up front: TransformerLens otherwise re-loads the tokenizer by name to get
    # that flag, which for a hub name means a network call.
    return AutoTokenizer.from_pretrained(str(path), add_bos_token=True)


def _processing(process_weights: bool) -> dict[str, bool]:
    return dict(
        fold_ln=process_weights,
        center_writing_weights=process_weights,
        center_unembed=process_weights,
        fold_value_biases=process_weights,
    )


def load_local_snapshot(
    path: str | Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    tokenizer=None,
    process_weights: bool = False,
) -> HookedTransformer:
    """A local Hugging Face checkpoint directory as a `HookedTransformer`, offline: config, weights and
    tokenizer all come from `path` (transformer-lens 3.9 conversion: `convert_hf_model_config` + the
    family's `convert_*_weights`). Families: FAMILIES (GPT-NeoX/Pythia, GPT-2, Llama-style)."""
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _read_neox_config(path)
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(path)
    quiet_library_bars()
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except OSError as e:
        raise SnapshotError(f"cannot load the weights of {path}: {e}") from e
    proc = _processing(process_weights)
    # transformer-lens picks some architectures by the *name* ("llama" or "gemma" in the path) before it
    # reads config.json, so it gets a copy of config.json under a neutral name. GPT-2 configs written by
    # transformers 5 lack `n_ctx`, which transformer-lens 3.9 reads (the hub's GPT-2 configs carry it).
    hf_json = json.loads((path / "config.json").read_text())
    if hf_json.get("model_type") == "gpt2" and "n_ctx" not in hf_json:
        hf_json["n_ctx"] = hf_json.get("n_positions", 1024)
    with tempfile.TemporaryDirectory(prefix="tlcfg-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf_json))
        cfg = loading.get_pretrained_model_config(
            tmp, hf_cfg=hf_model.config.to_dict(), fold_ln=proc["fold_ln"], device=device, dtype=dtype
        )
    state_dict = loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=dtype)
    del hf_model  # what the state dict does not share with it goes now; the rest as `_assemble` copies it
    return _assemble(cfg, state_dict, tokenizer, proc)


def _assemble(cfg, state_dict: dict, tokenizer, proc: dict[str, bool]) -> HookedTransformer:
    """A `HookedTransformer` holding `state_dict` (transformer-lens names). Unprocessed weights (the default
    here) are loaded in one `load_state_dict` into a model built without its random initialisation: what
    transformer-lens 3.9's `load_and_process_state_dict` does with every processing flag off, minus its
    `load_state_dict` per key (one walk of the module tree per key: 245 walks for Pythia-160M, 6-8 s of Python
    per snapshot on a 2-core CPU, about half of each load) and the wasted initialisation. Like it, each source
    tensor is dropped once copied, so a load holds the model and at most one copy of its weights."""
    from transformer_lens import HookedTransformer

    if any(proc.values()):
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        model.load_and_process_state_dict(state_dict, **proc)
    else:
        cfg.init_weights = False
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        state_dict = model.fill_missing_keys(state_dict)
        targets = model.state_dict(keep_vars=True)
        with torch.no_grad():  # key by key, dropping each source tensor once copied: one extra copy at most
            for key in list(state_dict):
                value = state_dict.pop(key)
                if key in targets:  # transformer-lens loads with strict=False too
                    targets[key].copy_(value)
                del value
    model.move_model_modules_to_device()
    return model.eval()


def load_pythia_snapshot(
    model_name: str,
    step: int,
    device: str = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    process_weights: bool = False,
    tokenizer=None,
    **hub_kwargs,
) -> HookedTransformer:
    """A real Pythia checkpoint (hub revision `step{N}`) through transformer-lens `checkpoint_value`.

    `hub_kwargs` go to Hugging Face's `from_pretrained` (`cache_dir=`, `local_files_only=True`, `revision`
    is set by transformer-lens). The hub must be reachable, or the revision already in the HF cache."""
    if step not in PYTHIA_STEPS:
        raise SnapshotError(
            f"{model_name} has no checkpoint step{step}; Pythia's steps are 0, 1, 2, 4, ..., 512 and "
            f"1000..143000 every 1000 (see PYTHIA_STEPS)"
        )
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoTokenizer

    tok_kwargs = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "local_files_only", "token")}
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_name, add_bos_token=True, **tok_kwargs)
    # HookedTransformer.from_pretrained(model_name, checkpoint_value=step, ...) step by step (transformer-lens
    # 3.9), so that the weights load through `_assemble`
    proc = _processing(process_weights)
    quiet_library_bars()
    official = loading.get_official_model_name(model_name)
    cfg = loading.get_pretrained_model_config(official, checkpoint_value=step, fold_ln=proc["fold_ln"],
                                              device=device, dtype=dtype, **hub_kwargs)
    state_dict = loading.get_pretrained_state_dict(official, cfg, None, dtype=dtype, **hub_kwargs)
    return _assemble(cfg, state_dict, tokenizer, proc)


def _is_hub_spec(spec: str | Path) -> bool:
    s = str(spec)
    return s.startswith("hf:") or (not Path(s).exists() and s.startswith("EleutherAI/pythia"))


def iter_snapshots(
    root_or_spec: str | Path,
    steps: Iterable[int] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    **load_kwargs,
) -> Iterator[tuple[int, HookedTransformer]]:
    """Yield `(step, model)` one model at a time, in step order.

    `root_or_spec` is a local snapshot root (holding `step{N}/` dirs) or a hub model, written
    `hf:EleutherAI/pythia-160m` (or a bare `EleutherAI/pythia-*` name). `steps=None` means every local
    step, or all of `PYTHIA_STEPS` for the hub. Missing steps are reported before anything is loaded."""
    if _is_hub_spec(root_or_spec):
        name = str(root_or_spec).removeprefix("hf:")
        wanted = sorted(steps) if steps is not None else list(PYTHIA_STEPS)
        bad = [s for s in wanted if s not in PYTHIA_STEPS]
        if bad:
            raise SnapshotError(f"{name}: steps {bad} are not Pythia checkpoints (see PYTHIA_STEPS)")
        for s in wanted:
            yield s, load_pythia_snapshot(name, s, device, dtype=dtype, **load_kwargs)
        return
    root = Path(root_or_spec)
    available = local_steps(root)
    if not available:
        raise SnapshotError(f"no step{{N}} snapshot directories under {root}")
    wanted = sorted(steps) if steps is not None else available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise SnapshotError(f"snapshot step(s) {missing} not found under {root}; available: {available}")
    for s in wanted:
        yield s, load_local_snapshot(root / f"step{s}", device, dtype, **load_kwargs)

