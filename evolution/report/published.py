"""What the README and docs publish about a run, regenerated from the run itself (`make reproduce`).

    python -m evolution.report.published runs/demo      # docs/demo.json, docs/figures/*.png, README's table

`published(run)` gathers the headline numbers (the phase verdict, boundary and every signal, the turning
point's verdict, the learning hierarchy, learned steps, crosscoder quality) into `docs/demo.json`; the figures
the README shows are copied from the run; the README's block between the `published` markers is rendered from
the JSON. A fast test checks that the README's block is the JSON's; a slow test reruns the demo recipe and
diffs its numbers against the JSON, so no published number outlives the code that made it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from crosscoders.io import write_json, write_text
from evolution.features.turning import turning_verdict

FIGURES = {"figures/phase_map.png": "phase_map.png", "figures/loss.png": "loss.png",
           "analysis/figures/hierarchy.png": "hierarchy.png", "analysis/figures/heatmap.png": "heatmap.png"}
"""Run-relative figure -> docs/figures/ name (the figures the README shows)."""
BEGIN, END = "<!-- published:begin (make reproduce writes this block from docs/demo.json) -->", "<!-- published:end -->"
HIERARCHY_COLUMNS = ("by", "group", "n", "n_from_start", "median_step", "ci_lo_step", "ci_hi_step", "mechanism",
                     "learned_step", "matched", "onset_step", "matched_onset")


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def published(run: str | Path) -> dict:
    """The run's headline numbers, as the README and docs state them."""
    run = Path(run)
    ph, s = _read(run / "phases.json"), _read(run / "analysis" / "summary.json")
    ev = _read(run / "crosscoder" / "eval.json")
    h = s.get("hierarchy") or {}
    return {
        "phases": {"verdict": ph.get("verdict"), "boundary_step": ph.get("boundary_step"),
                   "boundary_ci": ph.get("boundary_ci"), "agree": ph.get("agree") or [],
                   "signals": {k: {"step": v.get("step"), "ci": v.get("ci"), "used": bool(v.get("used")),
                                   "reason": v.get("reason")} for k, v in ph["signals"].items()}},
        "turning_point": turning_verdict(s.get("turning_point") or {}),
        "hierarchy": [{c: r.get(c) for c in HIERARCHY_COLUMNS} for r in h.get("table", [])],
        "learned_steps": h.get("learned_steps"),
        "crosscoder": {"fvu_mean": round(ev["fvu_mean"], 4), "l0_shared": round(ev["l0_shared"], 2),
                       "dead_frac_shared": round(ev["dead_frac_shared"], 4), "d_sae": s.get("n_features")},
    }


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, list):
        return "–".join(map(str, v))
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def render(numbers: dict) -> str:
    """The README block: the verdict, every signal, the turning point, the hierarchy table, crosscoder quality."""
    p = numbers["phases"]
    head = (f"**Boundary: step {p['boundary_step']} (CI {_cell(p['boundary_ci'])})**, agreeing signals: "
            f"{', '.join(p['agree'])}" if p["boundary_step"] is not None else "**Boundary: inconclusive**")
    lines = [BEGIN, "", head + f". Turning point: {numbers['turning_point']}.", "",
             "| signal | step | 95% CI | used |", "|---|---|---|---|"]
    lines += [f"| {k} | {_cell(v['step'])} | {_cell(v['ci'])} | {'yes' if v['used'] else 'no: ' + str(v['reason'])} |"
              for k, v in p["signals"].items()]
    lines += ["", "| " + " | ".join(HIERARCHY_COLUMNS) + " |", "|" + "---|" * len(HIERARCHY_COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in HIERARCHY_COLUMNS) + " |" for r in numbers["hierarchy"]]
    c = numbers["crosscoder"]
    lines += ["", f"Crosscoder ({c['d_sae']} latents): held-out FVU {c['fvu_mean']} (mean over snapshots), L0 "
              f"{c['l0_shared']}, {c['dead_frac_shared']:.1%} dead (never active on the held-out tokens).", "", END]
    return "\n".join(lines)


def readme_block(readme: str) -> str | None:
    """The README's published block (markers included), or None."""
    if BEGIN not in readme or END not in readme:
        return None
    return readme[readme.index(BEGIN): readme.index(END) + len(END)]


def reproduce(run: str | Path, root: str | Path = ".") -> dict:
    """docs/demo.json, docs/figures/*.png and the README's published block, from `run`."""
    run, root = Path(run), Path(root)
    numbers = published(run)
    write_json(root / "docs" / "demo.json", numbers)
    for src, name in FIGURES.items():
        if (run / src).exists():
            shutil.copyfile(run / src, root / "docs" / "figures" / name)
    readme = (root / "README.md").read_text()
    if (old := readme_block(readme)) is not None:
        write_text(root / "README.md", readme.replace(old, render(numbers)))
    return numbers


if __name__ == "__main__":
    reproduce(sys.argv[1] if len(sys.argv) > 1 else "runs/demo", sys.argv[2] if len(sys.argv) > 2 else ".")
