"""`feature-evolution compare RUN_A RUN_B`: two runs side by side (e.g. pre-training with and without the
nonlinearity regulariser, runs/demo.toml vs runs/demo-regularised.toml).

One figure per metric both runs have (held-out loss against step; each geometry metric per block against
step; the phase boundary with its CI; Δloss of linearising / removing each block), and a short table
(`compare.md`, `compare.json`) of the values at each run's last snapshot. Reads only what the stages
wrote (pretrain/log.jsonl, geometry.json, phases.json, interventions.json); a metric missing from either
run is listed as missing, not drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crosscoders.io import read_jsonl, write_json, write_text
from evolution.figures import fig_ax, save_figure, step_axis

GEOMETRY = ("linearity", "linearity_no_residual", "anisotropy", "id_twonn")
STYLES = ("-", "--")


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _loss_curve(run: Path) -> tuple[list[int], list[float]]:
    log = run / "pretrain" / "log.jsonl"
    if log.exists():
        rows = [r for r in read_jsonl(log) if "eval_loss" in r]
        return [r["step"] for r in rows], [r["eval_loss"] for r in rows]
    summ = _json(run / "eval" / "summary.json")
    rows = summ.get("snapshots", [])
    return [r["step"] for r in rows], [r["nll"] for r in rows]


def _geometry_figure(runs: list[Path], geos: list[dict], metric: str):
    fig, ax = fig_ax(None, figsize=(7, 4))
    for run, geo, ls in zip(runs, geos, STYLES, strict=True):
        vals = np.array([[np.nan if v is None else v for v in row] for row in geo["metrics"][metric]], float)
        for layer in range(vals.shape[1]):
            if np.isfinite(vals[:, layer]).any():
                ax.plot(geo["steps"], vals[:, layer], ls=ls, color=f"C{layer}", marker=".", label=f"{run.name} · layer {layer}")
    step_axis(ax, geos[0]["steps"] + geos[1]["steps"], grid=True)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: {runs[0].name} (solid) vs {runs[1].name} (dashed)")
    ax.legend(fontsize=6, ncol=2)
    return fig


def _last_block_values(data: dict, key: str) -> list[float | None]:
    last = data["snapshots"][str(data["steps"][-1])]
    return [b[key]["delta"] for b in last["blocks"]]


def compare_runs(run_a: str | Path, run_b: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write the comparison figures and table; returns the table as a dict {row: [value A, value B]}."""
    runs = [Path(run_a), Path(run_b)]
    for r in runs:
        if not r.is_dir():
            raise FileNotFoundError(f"no run directory at {r}")
    out = Path(out_dir) if out_dir else runs[0].parent / f"compare-{runs[0].name}-vs-{runs[1].name}"
    table: dict[str, list] = {}
    missing: list[str] = []
    figures: dict[str, object] = {}

    curves = [_loss_curve(r) for r in runs]
    if all(c[0] for c in curves):
        fig, ax = fig_ax(None, figsize=(7, 4))
        for r, (s, v), ls in zip(runs, curves, STYLES, strict=True):
            ax.plot(s, v, ls=ls, label=r.name)
        step_axis(ax, curves[0][0] + curves[1][0], grid=True)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.legend()
        figures["loss"] = fig
        table["final held-out loss"] = [round(c[1][-1], 4) for c in curves]
    else:
        missing.append("loss")

    geos = [_json(r / "geometry.json") for r in runs]
    for metric in GEOMETRY:
        if all(g.get("metrics", {}).get(metric) for g in geos):
            figures[f"geometry_{metric}"] = _geometry_figure(runs, geos, metric)
            table[f"{metric} per layer, last snapshot"] = [
                [None if v is None else round(v, 4) for v in g["metrics"][metric][-1]] for g in geos]
        else:
            missing.append(metric)

    phases = [_json(r / "phases.json") for r in runs]
    if all("boundary_step" in p for p in phases):
        fig, ax = fig_ax(None, figsize=(6, 2.5))
        for i, p in enumerate(phases):
            b, ci = p["boundary_step"], p.get("boundary_ci") or [None, None]
            if b is not None:
                # the CI as a span and the boundary as a point: a boundary can lie outside its members' intersected
                # CI (issue 24), which an errorbar's non-negative extents cannot draw
                lo, hi = (ci[0] if ci[0] is not None else b), (ci[1] if ci[1] is not None else b)
                ax.hlines(i, lo, hi, color=f"C{i}", lw=2)
                ax.plot([b], [i], "o", color=f"C{i}")
        ax.set_yticks([0, 1], [r.name for r in runs])
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("phase boundary step (CI)")
        figures["phase_boundary"] = fig
        table["phase boundary step [CI]"] = [[p["boundary_step"], p.get("boundary_ci")] for p in phases]
        table["phase verdict"] = [p.get("verdict") for p in phases]
    else:
        missing.append("phase boundary")

    ivs = [_json(r / "interventions.json") for r in runs]
    if all(iv.get("steps") for iv in ivs):
        for mode in ("linear", "identity"):
            fig, ax = fig_ax(None, figsize=(7, 4))
            for r, iv, ls in zip(runs, ivs, STYLES, strict=True):
                for blk in range(len(iv["snapshots"][str(iv["steps"][0])]["blocks"])):
                    ax.plot(iv["steps"], [iv["snapshots"][str(s)]["blocks"][blk][mode]["delta"] for s in iv["steps"]],
                            ls=ls, color=f"C{blk}", marker=".", label=f"{r.name} · block {blk}")
            step_axis(ax, ivs[0]["steps"] + ivs[1]["steps"], grid=True)
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_ylabel(f"Δ loss, block {'→ linear map' if mode == 'linear' else 'removed'}")
            ax.legend(fontsize=6)
            figures[f"interventions_{mode}"] = fig
            table[f"Δloss {mode} per block, last snapshot"] = [[round(v, 4) for v in _last_block_values(iv, mode)] for iv in ivs]
    else:
        missing.append("interventions")

    for name, fig in figures.items():
        save_figure(fig, out / f"{name}.png")
    result = {"runs": [str(r) for r in runs], "table": table, "missing": missing, "figures": sorted(figures)}
    write_json(out / "compare.json", result)
    lines = [f"| | {runs[0].name} | {runs[1].name} |", "|---|---|---|"]
    lines += [f"| {k} | {v[0]} | {v[1]} |" for k, v in table.items()]
    if missing:
        lines.append(f"\nNot in both runs: {', '.join(missing)}")
    write_text(out / "compare.md", "\n".join(lines) + "\n")
    return result


def compare_cli(argv: list[str]) -> dict:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="feature-evolution compare", description=__doc__.split("\n")[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--out", default=None, help="output directory (default: <root>/compare-A-vs-B)")
    ns = p.parse_args(argv)
    res = compare_runs(ns.run_a, ns.run_b, ns.out)
    print((Path(ns.out) if ns.out else Path(ns.run_a).parent / f"compare-{Path(ns.run_a).name}-vs-{Path(ns.run_b).name}")
          .joinpath("compare.md").read_text(), file=sys.stderr)
    return res
