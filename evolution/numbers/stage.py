"""The numbers stage: the helix fit (`evolution.numbers.helix`) per snapshot and residual point.

For every snapshot (one model in memory at a time, from the loaders the pipeline gives) and every
residual point (block inputs + last block output, as the geometry stage), the number tokens' activations
(`evolution.numbers.acts`) are fitted; `numbers.json` holds, per step and layer, the helix R² (held out)
with its baselines (PCA, linear, random periods) and shuffled null, each period's strength with its null,
and the Fourier spectrum. **Emergence** (`helix.emergence_step`): the first step from which a period's
strength (or the helix R²) stays above its shuffled-number null at every later snapshot. The planted
number mechanisms' learned steps (`pretrain/learned_steps.json`, "count" and "add") are copied beside
them, so the two can be read together. Resumable: steps already in `numbers.json` under the same config
are kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from crosscoders.dataclass_cli import config_hash, to_dict
from crosscoders.io import write_json
from crosscoders.progress import progress_bar
from evolution.numbers.helix import HelixConfig, emergence_step, fit_helix

NUMBERS_VERSION = 1


@dataclass
class NumbersConfig(HelixConfig):
    """[numbers]: the helix analysis across snapshots (Kantamneni & Tegmark 2025); the fit's own settings
    (periods, n_pca, n_folds, n_null, n_random_periods, null_quantile, seed) are `HelixConfig`'s."""

    enabled: bool | None = None
    """Run the stage: None = only when the planted corpus has numbers (corpus.planted.p_number > 0)."""
    n_numbers: int = 100
    """The numbers 0..n_numbers-1."""
    templates: list[str] | None = None
    """Prompt templates with one "{a}" (None: `acts.default_templates` for the tokenizer)."""
    pool: str = "single"
    """single (every number one token, else an error) | last | mean: see `evolution.numbers.acts`."""
    report_layer: int = 1
    """Residual point shown in the figure's period panels: 1 = after block 0, the paper's h^0 (its §4)."""
    batch_size: int = 64
    """Prompts per forward pass."""


def model_numbers(model, tokenizer, cfg: NumbersConfig) -> dict:
    """One model: {"hooks": [...], "fits": [HelixFit dict per residual point]}."""
    import torch

    from evolution.numbers.acts import number_acts

    numbers = list(range(cfg.n_numbers))
    acts, hooks = number_acts(model, tokenizer, numbers, cfg.templates, cfg.pool, cfg.batch_size)
    a = torch.arange(cfg.n_numbers, dtype=torch.float64)
    return {"hooks": hooks, "fits": [fit_helix(acts[i], a, cfg).to_dict() for i in range(len(hooks))]}


def summarize(records: dict[int, dict], cfg: NumbersConfig, learned: dict | None = None) -> dict:
    """Arrays [step][layer] of every measure, emergence steps per layer, from the per-step records."""
    steps = sorted(records)
    fits = [records[s]["fits"] for s in steps]
    n_layers = len(fits[0]) if fits else 0
    keys = [f"{T:g}" for T in cfg.periods]

    def grid(fn):
        return [[fn(f) for f in per_step] for per_step in fits]

    out = {m: grid(lambda f, m=m: f[m]) for m in ("helix_r2", "pca_r2", "linear_r2", "random_periods_r2",
                                                   "random_periods_r2_q95", "shuffled_r2_null")}
    out["strength"] = {k: grid(lambda f, k=k: f["strength"][k]) for k in keys}
    out["strength_null"] = {k: grid(lambda f, k=k: f["strength_null"][k]) for k in keys}
    out["spectrum"] = grid(lambda f: f["spectrum"])
    out["spectrum_periods"] = fits[0][0]["spectrum_periods"] if fits else None
    col = lambda g, layer: [row[layer] for row in g]  # noqa: E731
    out["emergence"] = {
        "helix": [emergence_step(steps, col(out["helix_r2"], i), col(out["shuffled_r2_null"], i)) for i in range(n_layers)],
        "periods": {k: [emergence_step(steps, col(out["strength"][k], i), col(out["strength_null"][k], i))
                        for i in range(n_layers)] for k in keys},
    }  # fmt: skip
    return {"steps": steps, "hooks": records[steps[0]]["hooks"] if steps else [], "periods": list(cfg.periods),
            "report_layer": min(cfg.report_layer, max(n_layers - 1, 0)), "learned_steps": learned or {}, **out}


def numbers(run_dir: str | Path, cfg: NumbersConfig, steps: Sequence[int], loaders: Sequence[Callable],
            tokenizer=None) -> dict:
    """Fit every snapshot (`loaders[i]()` is the model of `steps[i]`); write numbers.json and figures/numbers.png."""
    from evolution.figures import save_figure
    from evolution.numbers.plots import numbers_figure

    run = Path(run_dir)
    if tokenizer is None:
        from transformers import PreTrainedTokenizerFast

        tok_dir = run / "corpus" / "tokenizer"
        if not tok_dir.exists():
            raise FileNotFoundError(f"{tok_dir} not found: build the corpus first")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    key = config_hash({"config": to_dict(cfg), "version": NUMBERS_VERSION})
    path = run / "numbers.json"
    records: dict[int, dict] = {}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            records = {int(s): r for s, r in old.get("records", {}).items() if int(s) in steps}
    learned_path = run / "pretrain" / "learned_steps.json"
    learned = json.loads(learned_path.read_text()) if learned_path.exists() else {}
    learned = {k: v for k, v in learned.items() if k in ("count", "add")}
    for step, load in progress_bar(list(zip(steps, loaders, strict=True)), desc="numbers", unit="snapshot"):
        if step in records:
            continue
        model = load()
        records[step] = model_numbers(model, tokenizer, cfg)
        del model
        write_json(path, {"version": NUMBERS_VERSION, "key": key, "config": to_dict(cfg), "complete": False,
                          "records": {str(s): r for s, r in sorted(records.items())}})
    result = {"version": NUMBERS_VERSION, "key": key, "config": to_dict(cfg), "complete": True,
              **summarize(records, cfg, learned), "records": {str(s): r for s, r in sorted(records.items())}}
    write_json(path, result)
    save_figure(numbers_figure(result), run / "figures" / "numbers.png")
    return result


def numbers_table(data: dict, layer: int | None = None) -> list[dict]:
    """One row per step at `layer` (default: the report layer): helix R², baselines, null, period strengths."""
    layer = data["report_layer"] if layer is None else layer
    rows = []
    for i, s in enumerate(data["steps"]):
        row = {"step": s, "helix_r2": data["helix_r2"][i][layer], "null_q": data["shuffled_r2_null"][i][layer],
               "pca_r2": data["pca_r2"][i][layer], "linear_r2": data["linear_r2"][i][layer],
               "random_periods_r2": data["random_periods_r2"][i][layer]}
        for k in data["strength"]:
            row[f"T{k}"] = data["strength"][k][i][layer]
            row[f"T{k}_null"] = data["strength_null"][k][i][layer]
        rows.append(row)
    return rows


def numbers_on(cfg) -> bool:
    """The numbers stage runs when asked to, or (enabled unset) when the planted corpus has number tokens."""
    if cfg.numbers.enabled is not None:
        return cfg.numbers.enabled
    return cfg.corpus.source == "planted" and cfg.corpus.planted.p_number > 0


def numbers_stage(ctx) -> None:
    """The number helix per snapshot, through the run's snapshot source."""
    numbers(ctx.run_dir, ctx.cfg.numbers, ctx.steps, ctx.loaders())
