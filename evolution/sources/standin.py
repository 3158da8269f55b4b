"""Random-weight stand-ins for Pythia's hub checkpoints, laid out as an offline Hugging Face hub cache.

No hub is reachable from the machines this suite is built on, yet its main job reads `step{N}` revisions of
`EleutherAI/pythia-160m`. `build_pythia_standin` writes checkpoints with a Pythia model's exact architecture
(Biderman et al. 2023, Table 1, and each model's config.json on the hub: GPT-NeoX, parallel attention + MLP,
rotary on 25% of the head dimensions, untied embeddings, a 50,304-row vocabulary) and a GPT-NeoX-style
tokenizer ("<|endoftext|>" at id 0, a byte-level BPE trained on Shakespeare), one revision per step, in the
layout `huggingface_hub` reads offline (`models--EleutherAI--pythia-160m/refs/step{N}` → `snapshots/<commit>/`).
The real loading code (`load_pythia_snapshot`, transformer-lens `checkpoint_value`) then runs unchanged with
`cache_dir=` and `local_files_only=True`: the full-width dry run (`runs/pythia-160m-dryrun.toml`,
`python -m benchmarks.dryrun`) exercises every stage at the real shape without a download.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PythiaArch:
    """A Pythia model's shape, as its hub config.json states it (d_mlp = 4 d_model), and its parameter count."""

    params: int
    n_layers: int
    d_model: int
    n_heads: int
    n_ctx: int = 2048
    vocab_size: int = 50304  # the embedding's rows; the real tokenizer holds 50,277 of them

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model


# Biderman et al. 2023 (Pythia), Table 1: parameters, layers, d_model, heads
PYTHIA_ARCH = {"pythia-14m": PythiaArch(14_067_712, 6, 128, 4), "pythia-70m": PythiaArch(70_426_624, 6, 512, 8),
               "pythia-160m": PythiaArch(162_322_944, 12, 768, 12), "pythia-410m": PythiaArch(405_334_016, 24, 1024, 16),
               "pythia-1b": PythiaArch(1_011_781_632, 16, 2048, 8), "pythia-1.4b": PythiaArch(1_414_647_808, 24, 2048, 16),
               "pythia-2.8b": PythiaArch(2_775_208_960, 32, 2560, 32),
               "pythia-6.9b": PythiaArch(6_857_302_016, 32, 4096, 32),
               "pythia-12b": PythiaArch(11_846_072_320, 36, 5120, 40)}


def write_hub_cache(cache: Path, repo: str, revisions: dict[str, Path], move: bool = False) -> Path:
    """Lay `revisions` (name -> checkpoint directory) out as the hub cache does: refs/<rev> holds a commit
    hash, snapshots/<commit>/ the files. Returns the repo's cache folder."""
    base = Path(cache) / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    for i, (rev, src) in enumerate(revisions.items()):
        commit = f"{i:040x}"
        dst = base / "snapshots" / commit
        if move:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        else:
            shutil.copytree(src, dst)
        (base / "refs" / rev).write_text(commit)
    return base


def _tokenizer(vocab_size: int):
    from evolution.sources.corpus import shakespeare_texts
    from evolution.sources.tokenizer import train_bpe

    return train_bpe(shakespeare_texts(), vocab_size)


def _model(arch: PythiaArch, seed: int, bos: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=arch.vocab_size, hidden_size=arch.d_model, num_hidden_layers=arch.n_layers,
                        num_attention_heads=arch.n_heads, intermediate_size=arch.d_mlp,
                        max_position_embeddings=arch.n_ctx, rotary_pct=0.25, rotary_emb_base=10000,
                        use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
                        layer_norm_eps=1e-5, initializer_range=0.02, bos_token_id=bos, eos_token_id=bos)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(cfg).eval()


def standin_complete(cache: Path, repo: str, steps: list[int]) -> bool:
    refs = Path(cache) / ("models--" + repo.replace("/", "--")) / "refs"
    return all((refs / r).exists() for r in ["main"] + [f"step{s}" for s in steps])


def build_pythia_standin(cache: str | Path, steps: list[int], repo: str = "EleutherAI/pythia-160m", *,
                         seed: int = 0, tokenizer_vocab: int = 8192, dtype: torch.dtype = torch.float16,
                         drift: float = 0.3) -> Path:
    """Write random-weight `step{N}` revisions of `repo` (its exact architecture) into the hub cache `cache`;
    `main` is the last step (transformer-lens reads the architecture from it). Idempotent: an existing complete
    cache is kept. The snapshots lie on a path, W(step) = W0 + drift · t(step) · ΔW with t = log-step position in
    [0, 1], so that consecutive snapshots are related as a training run's are. Stored in fp16 as Pythia's are."""
    cache = Path(cache)
    name = repo.split("/")[-1].removesuffix("-deduped")
    if name not in PYTHIA_ARCH:
        raise ValueError(f"no architecture for {repo!r}; known: {', '.join(PYTHIA_ARCH)}")
    if standin_complete(cache, repo, steps):
        return cache
    arch = PYTHIA_ARCH[name]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".standin.", dir=cache))
    try:
        tok = _tokenizer(tokenizer_vocab)
        bos = tok.bos_token_id
        base, delta = _model(arch, seed, bos), _model(arch, seed + 1, bos).state_dict()
        pos = torch.log1p(torch.tensor(steps, dtype=torch.float64))
        pos = (pos - pos.min()) / (pos.max() - pos.min()).clamp_min(1e-12)
        start = {k: v.clone() for k, v in base.state_dict().items()}
        revisions = {}
        for step, t in zip(steps, pos.tolist(), strict=True):
            with torch.no_grad():
                for k, p in base.state_dict().items():
                    if p.is_floating_point():
                        p.copy_(start[k] + drift * t * (delta[k] - start[k]))
            out = tmp / f"step{step}"
            base.to(dtype).save_pretrained(out, safe_serialization=True)
            base.float()
            tok.save_pretrained(out)
            cfg = json.loads((out / "config.json").read_text())
            (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": str(dtype).split(".")[-1]}, indent=2))
            revisions[f"step{step}"] = out
        shutil.rmtree(cache / ("models--" + repo.replace("/", "--")), ignore_errors=True)
        last = revisions[f"step{steps[-1]}"]
        shutil.copytree(last, tmp / "main")
        write_hub_cache(cache, repo, {**revisions, "main": tmp / "main"}, move=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache
