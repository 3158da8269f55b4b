"""Planted-feature recovery over a family of generators (issue 23): every scheme x gate with its defaults.

    python -m benchmarks.recovery_sweep --draws 12 \\
        --schemes relu:shared,relu:per_source,batchtopk:shared,jumprelu:shared,jumprelu:per_source

For each draw `crosscoders.synthetic.family_config(seed)` (seeds 0..draws-1) and each scheme x gate, a crosscoder
is trained through `crosscoders.train.train` with the defaults of CrosscoderConfig / TrainConfig. Set from the
draw, by one rule for every scheme (`train_config`), and nothing else:

- the shape: n_sources, d_in, d_sae = 4 x n_features rounded up to a multiple of 8 (tests/crosscoders/
  test_recovery.py's ratio);
- batch 256 and steps = max(1000, 3000 F / (256 L0)) rounded up to 100, at most 3000: every planted feature
  fires on >= ~3000 training tokens, and the schedule (5% warm-up, decay over the last 20%) has >= 1000 steps;
- batchtopk's k = 1.5 x the planted L0 (k is the L0 a user asks for, not a coefficient; test_recovery's rule);
- prefetch = 0 (the batches are the same either way; no second thread on a shared CPU).

Judged by `recovery_report` (per snapshot: one latent's decoder cosine >= 0.9 in every snapshot where the feature
is alive; exact peak = argmax of its raw decoder norm), with L0, FVU and dead fraction on 4,096 held-out tokens.
Bars: frac_recovered >= 0.95 and frac_peak_correct >= 0.90 on every draw. Writes
benchmarks/results/recovery_sweep.json (after every draw, so a cut-short sweep keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from crosscoders.config import CrosscoderConfig, TrainConfig
from crosscoders.evaluation import evaluate
from crosscoders.synthetic import PlantedFeatures, family_config, recovery_report
from crosscoders.train import train

SCHEMES = ["relu:shared", "relu:per_source", "batchtopk:shared", "jumprelu:shared", "jumprelu:per_source"]
BATCH = 256
BARS = {"frac_recovered": 0.95, "frac_peak_correct": 0.90}
RESULTS = Path(__file__).parent / "results" / "recovery_sweep.json"


def train_config(truth: PlantedFeatures, activation: str, gate: str, **overrides: object) -> TrainConfig:
    """The scheme's defaults, with only the shape, batch, steps (and batchtopk's k) set from the draw; `overrides`:
    TrainConfig fields set for every scheme and draw (the CLI's --sparsity-coef)."""
    c = truth.cfg
    F, l0 = c.n_features, truth.planted_l0
    steps = min(3000, max(1000, 100 * math.ceil(3000 * F / (BATCH * l0) / 100)))
    cc = CrosscoderConfig(n_sources=c.n_sources, d_in=c.d_in, d_sae=8 * math.ceil(4 * F / 8), activation=activation,
                          gate=gate, k=1.5 * l0, seed=c.seed)
    return TrainConfig(crosscoder=cc, steps=steps, batch_size=BATCH, progress=False, checkpoint_every=10**9,
                       log_every=max(steps // 10, 1), prefetch=0, **overrides)


def run_scheme(truth: PlantedFeatures, scheme: str, out_dir: str | Path, **overrides: object) -> dict:
    """Train one scheme x gate on one draw and judge it."""
    activation, gate = scheme.split(":")
    cfg = train_config(truth, activation, gate, **overrides)
    scale = truth.norm_scale()
    t0 = time.perf_counter()
    model = train(cfg, truth.batch_source(BATCH, scale), out_dir, norm_scale=scale)
    seconds = time.perf_counter() - t0
    rep = recovery_report(model, truth)
    held_out = truth.sample(4096, torch.Generator().manual_seed(10**6 + truth.cfg.seed))  # raw units, like the model
    ev = evaluate(model, [held_out])
    return {"frac_recovered": rep["frac_recovered"], "frac_peak_correct": rep["frac_peak_correct"],
            "frac_peak_within_1": rep["frac_peak_within_1"], "median_cos": rep["median_cos"],
            "l0": ev["l0"], "planted_l0": truth.planted_l0, "fvu_mean": ev["fvu_mean"], "dead_frac": ev["dead_frac"],
            "d_sae": cfg.crosscoder.d_sae, "steps": cfg.steps, "lr": cfg.lr_resolved, "seconds": seconds,
            "passes": all(rep[k] >= v for k, v in BARS.items())}


def run_draw(seed: int, schemes: list[str] = SCHEMES, verbose: bool = True, **overrides: object) -> dict:
    """Every scheme on the draw `family_config(seed)`: its settings and, per scheme, `run_scheme`'s result."""
    truth = PlantedFeatures(family_config(seed))
    draw = {"seed": seed, "settings": asdict(truth.cfg), "planted_l0": truth.planted_l0, "results": {}}
    if verbose:
        print(f"draw {seed}: {describe(draw)}", flush=True)
    for scheme in schemes:
        with tempfile.TemporaryDirectory() as d:
            r = run_scheme(truth, scheme, d, **overrides)
        draw["results"][scheme] = r
        if verbose:
            print(f"  {scheme:20s} recovered {r['frac_recovered']:.2f}  exact peak {r['frac_peak_correct']:.2f}  "
                  f"L0 {r['l0']:.2f} / planted {r['planted_l0']:.2f}  FVU {r['fvu_mean']:.3f}  "
                  f"dead {r['dead_frac']:.2f}  {r['steps']} steps  {r['seconds']:.0f} s", flush=True)
    return draw


def describe(draw: dict) -> str:
    """One line of a draw's settings (what the slow test prints)."""
    c = draw["settings"]
    turn = f"turn at {c['turn_at']} ({c['turn_frac']:.2f} of features, {c['turn_angle']:.2f} rad)" \
        if c["turn_at"] is not None else "no turn"
    return (f"S {c['n_sources']} x d_in {c['d_in']}, {c['n_features']} features, L0 {draw['planted_l0']:.2f}, "
            f"{c['profile']} (margin {c['peak_margin']:.2f}, max_life {c['max_life']}), {c['magnitude']} magnitudes "
            f"(mag_noise {c['mag_noise']:.2f}), co_active {c['co_active']:.2f}, rotation {c['max_rotation']:.2f}, "
            f"{turn}, noise {c['noise']:.3f} (decay {c['noise_decay']:.2f}), offset {c['offset']:.2f}")


def table(draws: list[dict]) -> dict:
    """Per scheme over the draws: min / median of recovered and exact peak, L0 reached / planted (median, range)."""
    out = {}
    for scheme in draws[0]["results"]:
        rs = [d["results"][scheme] for d in draws if scheme in d["results"]]
        rec, peak = [r["frac_recovered"] for r in rs], [r["frac_peak_correct"] for r in rs]
        ratio = [r["l0"] / r["planted_l0"] for r in rs]
        out[scheme] = {"draws": len(rs), "recovered_min": min(rec), "recovered_median": statistics.median(rec),
                       "peak_min": min(peak), "peak_median": statistics.median(peak),
                       "l0_over_planted_median": statistics.median(ratio), "l0_over_planted_min": min(ratio),
                       "l0_over_planted_max": max(ratio), "draws_passing": sum(r["passes"] for r in rs),
                       "seconds_total": sum(r["seconds"] for r in rs)}
    return out


def format_table(tab: dict) -> str:
    lines = [f"{'scheme':20s} {'recovered min/med':>18s} {'exact peak min/med':>19s} {'L0/planted med [min-max]':>26s} "
             f"{'pass':>6s}"]
    for s, t in tab.items():
        lines.append(f"{s:20s} {t['recovered_min']:8.2f} / {t['recovered_median']:.2f} {t['peak_min']:9.2f} / "
                     f"{t['peak_median']:.2f} {t['l0_over_planted_median']:10.2f} [{t['l0_over_planted_min']:.2f}-"
                     f"{t['l0_over_planted_max']:.2f}] {t['draws_passing']:>3d}/{t['draws']}")
    return "\n".join(lines)


def sweep(seeds: list[int], schemes: list[str] = SCHEMES, out: Path | None = RESULTS, **overrides: object) -> dict:
    t0 = time.perf_counter()
    draws = []
    result: dict = {}
    for seed in seeds:
        draws.append(run_draw(seed, schemes, **overrides))
        result = {"bars": BARS, "batch": BATCH, "threads": torch.get_num_threads(), "overrides": overrides, "draws": draws,
                  "table": table(draws), "seconds": time.perf_counter() - t0}
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
    print(format_table(result["table"]), f"\n{len(draws)} draws in {result['seconds']:.0f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recovery_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--draws", type=int, default=12, help="seeds 0..draws-1 of family_config")
    p.add_argument("--first", type=int, default=0, help="first seed")
    p.add_argument("--seeds", default="", help="comma-separated seeds (instead of --first / --draws)")
    p.add_argument("--sparsity-coef", type=float, default=None, help="TrainConfig.sparsity_coef for every scheme")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated activation:gate")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: leave the other cores free)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(range(a.first, a.first + a.draws))
    overrides = {} if a.sparsity_coef is None else {"sparsity_coef": a.sparsity_coef}
    return sweep(seeds, a.schemes.split(","), a.out, **overrides)


if __name__ == "__main__":
    main()
