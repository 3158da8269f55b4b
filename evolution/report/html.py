"""The run report: one self-contained HTML page (`runs/<name>/report.html`) that opens from disk.

Sections follow the order a reader wants: the phase map first (the answer), then the evidence
(loss against its references, feature timelines, peak steps, the turning point, what the features
are), then the tools' quality (crosscoder FVU/L0/dead per snapshot, geometry) and the resolved
config. Figures are embedded as base64 PNGs so the page needs no server and no sibling files,
except the optional link into the feature browser.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from crosscoders.io import read_jsonl, write_text
from evolution.features.hierarchy import clear_mechanism
from evolution.features.plots import TYPE_SCORE_COLUMNS
from evolution.features.turning import turning_verdict

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
img{max-width:100%;border:1px solid #eee} table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right} th{background:#f5f5f5}
td.l,th.l{text-align:left} .muted{color:#888} .ctx{font-family:ui-monospace,monospace;font-size:.85em}
.ctx mark{background:#ffd54f;padding:0 .15em} .warn{border:2px solid #c62828;background:#fdecea;padding:.5em 1em;margin:1em 0} nav a{margin-right:1em} pre{background:#f7f7f7;padding:1em;overflow:auto}
.kv td{text-align:left}
"""


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return f'<p class="muted">({html.escape(alt)}: not computed for this run — {html.escape(path.name)} missing)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _json(path: Path) -> dict | None:
    """A stage's JSON output, None where the stage did not run; a file that exists but does not parse is an
    error naming it (never shown as "not run")."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): rerun the stage that wrote it") from e


def _table(df: pd.DataFrame, left: tuple[str, ...] = ()) -> str:
    head = "".join(f'<th class="{"l" if c in left else ""}">{html.escape(str(c))}</th>' for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            v = r[c]
            text = f"{v:.4g}" if isinstance(v, float) else str(v)
            cells.append(f'<td class="{"l" if c in left else ""}">{html.escape(text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _context_html(ctx: dict) -> str:
    toks = [html.escape(t) for t in ctx.get("tokens", [])]
    j = ctx.get("highlight")
    if j is not None and 0 <= j < len(toks):
        toks[j] = f"<mark>{toks[j]}</mark>"
    return f'<div class="ctx">{" ".join(toks)} <span class="muted">({ctx.get("activation", 0):.3g})</span></div>'


def _phase_section(run: Path) -> str:
    ph = _json(run / "phases.json")
    out = [_img(run / "figures" / "phase_map.png", "phase map")]
    if ph:
        b = ph.get("boundary_step")
        if ph.get("verdict") == "inconclusive" or b is None:
            out.append("<p><b>Statistical → feature phase boundary: inconclusive.</b> "
                       f"{html.escape(str(ph.get('explanation', '')))}. No boundary is published.</p>")
        else:
            out.append(f"<p><b>Statistical → feature phase boundary: step {b}</b> (CI {ph.get('boundary_ci')}): "
                       f"{html.escape(str(ph.get('explanation', '')))}</p>")
        sig = ph.get("signals", {})
        agree = set(ph.get("agree") or [])  # the calibrated verdict's agreeing signals, and nothing else
        if sig:
            rows = [{"signal": k, "step": "—" if v.get("step") is None else str(v["step"]),
                     "95% CI": "—" if not v.get("ci") else f"{v['ci'][0]}..{v['ci'][1]}",
                     "effect": "—" if v.get("effect") is None else f"{v['effect']:.3g} ({v.get('effect_name', '')})",
                     "agrees within CIs": ("yes" if k in agree else "no") if v.get("used") else "not used",
                     "evidence": _evidence(v)} for k, v in sig.items()]
            out.append(_table(pd.DataFrame(rows), left=("signal", "evidence")))
    return "".join(out)


def _hierarchy_section(run: Path) -> str:
    h = (_json(run / "analysis" / "summary.json") or {}).get("hierarchy") or {}
    if not h.get("table"):
        return "<p>No hierarchy: no typed features or ground-truth mechanisms in this run.</p>"
    cols = ["by", "group", "n", "n_from_start", "median_step", "q25_step", "q75_step", "ci_lo_step", "ci_hi_step",
            "mechanism", "learned_step", "matched", "onset_step", "matched_onset", "note"]
    out = [f"<p>Emergence: {html.escape(h.get('emergence', ''))}; median, IQR and the 95% bootstrap CI of the median "
           "over features, in steps; a mechanism is matched when its features' median lies within one "
           "snapshot interval of its learned step (matched_onset: of its learning onset, where its loss has "
           "fallen 10% of the way). Copy and topic features must read more than their current "
           "token (lift over the token-matched baseline ≥ 1.5).</p>"]
    for title, fig, part in (("By emergence (rising edge)", "hierarchy.png", h),
                             ("By peak snapshot", "hierarchy_peak.png", h.get("peak") or {})):
        if not part.get("table"):
            continue
        df = pd.DataFrame(part["table"]).reindex(columns=cols)
        out += [f"<h3>{title}</h3>", _img(run / "analysis" / "figures" / fig, f"learning hierarchy, {title.lower()}"),
                _table(df.astype(object).where(df.notna(), "—"), left=("note",))]
        for o in part.get("order", []):
            out.append(f"<p>{o['before']} before {o['after']}: {'holds' if o['holds'] else 'does not hold'}"
                       f"{' (CIs separated)' if o['separated'] else ' (CIs overlap)'}</p>")
    return "".join(out)


def _evidence(signal: dict) -> str:
    """One line of what a phase signal saw: its reason when unused, else its measured values."""
    if signal.get("reason"):
        return str(signal["reason"])
    keys = [k for k in ("value", "before", "after", "reference") if k in signal]
    return ", ".join(f"{k} {signal[k]:.3g}" for k in keys if isinstance(signal[k], (int, float)))


def _loss_section(run: Path) -> str:
    meta = _json(run / "corpus" / "meta.json") or {}
    out = [_img(run / "figures" / "loss.png", "loss against references")]
    if "unigram_entropy" in meta:
        out.append(
            f"<p>Corpus unigram entropy {meta['unigram_entropy']:.3f} nats/token, "
            f"bigram entropy {meta['bigram_entropy']:.3f} nats/token.</p>"
        )
    learned = _json(run / "pretrain" / "learned_steps.json")
    if learned:
        rows = [{"mechanism": k, "learned at step": v} for k, v in learned.items()]
        out.append(_table(pd.DataFrame(rows), left=("mechanism",)))
    rows = [r for r in read_jsonl(run / "pretrain" / "log.jsonl") if "eval_loss" in r]
    if rows:
        out.append(f"<p>Final eval loss {rows[-1]['eval_loss']:.3f} at step {rows[-1]['step']}.</p>")
    return "".join(out)


def _features_section(run: Path) -> str:
    a = run / "analysis"
    figs = a / "figures"
    out = [
        "<h3>Relative decoder norm per feature and snapshot (sorted by peak)</h3>",
        _img(figs / "heatmap.png", "decoder-norm heatmap"),
        "<h3>Example timelines per group</h3>",
        _img(figs / "timelines_by_group.png", "timelines by group"),
    ]
    if (figs / "timelines_by_type.png").exists():
        out += ["<h3>Example timelines per type</h3>", _img(figs / "timelines_by_type.png", "timelines by type")]
    if (a / "browser" / "index.html").exists():
        out.append('<p><a href="analysis/browser/index.html">Open the feature browser</a> (every feature, sortable).</p>')
    return "".join(out)


def _peak_section(run: Path) -> str:
    s = _json(run / "analysis" / "summary.json") or {}
    out = [_img(run / "analysis" / "figures" / "peak_steps.png", "peak-step distribution")]
    feats = run / "analysis" / "features.csv"
    if feats.exists():
        df = pd.read_csv(feats)
        if "group" in df:
            counts = df["group"].value_counts().rename_axis("group").reset_index(name="features")
            out.append(_table(counts, left=("group",)))
    by_type = s.get("peak_step_by_clear_type")
    if by_type:
        rows = [{"ground-truth type": t, "features": v["n"], "median peak step": v["median"], "mean peak step": round(v["mean"])}
                for t, v in sorted(by_type.items(), key=lambda kv: kv[1]["median"])]
        out.append(f"<p>Peak step per ground-truth type (features whose activation falls on their type's tokens "
                   f"≥ {s.get('type_min_lift', 1.5)}× its base rate):</p>")
        out.append(_table(pd.DataFrame(rows), left=("ground-truth type",)))
    ind = s.get("peak_step_induction_features") or {}
    if ind.get("n"):
        out.append(f"<p>{ind['n']} features typed induction (type_score_induction clears its null): median peak "
                   f"step {ind['median']:.0f}.</p>")
    out.append("<h3>Turning point</h3>")
    out.append(_img(run / "analysis" / "figures" / "cos_to_final.png", "direction cosine to final"))
    tp = s.get("turning_point") or {}
    # the verdict as phases.json states it (it copies the analysis's; a run without phases.json: the analysis's)
    tp = {**tp, **((_json(run / "phases.json") or {}).get("signals", {}).get("crosscoder_turning_point") or {})}
    if tp.get("step") is not None:
        frac = tp.get("fraction_ci") or [float("nan")] * 2
        out.append(f"<p><b>Turning point: {html.escape(turning_verdict(tp))}</b> (95% CI {tp.get('ci')}), where the "
                   "decoder directions' angle to their final direction falls fastest per unit log-step; "
                   f"{tp.get('fraction', 0):.0%} of alive features turn there (CI {frac[0]:.0%}..{frac[1]:.0%}). "
                   "Ge et al. 2025 report ~1000 on Pythia.</p>")
    return "".join(out)


def _types_section(run: Path, per_type: int = 3, per_feature: int = 3) -> str:
    feats = run / "analysis" / "features.csv"
    ctx = _json(run / "analysis" / "contexts.json") or {}
    if not feats.exists():
        return '<p class="muted">(no feature table: analysis not run)</p>'
    df = pd.read_csv(feats)
    out = []
    score_cols = [c for c in TYPE_SCORE_COLUMNS if c in df]
    if "gt_type" in df:  # the planted mechanism where the feature is clearly of it (token-matched lift)
        df = df.assign(gt_type=clear_mechanism(df))
        groups = [(f"ground-truth type: {t}", g) for t, g in df[df["gt_type"].notna()].groupby("gt_type")]
        key = "gt_purity" if "gt_purity" in df else "max_norm"
    else:
        groups = [(f"top by {c}", df) for c in score_cols]
        key = None
    if not groups:
        return '<p class="muted">(no type scores: probes not run)</p>'
    for title, g in groups:
        col = key or title.removeprefix("top by ")
        top = g.sort_values(col, ascending=False).head(per_type)
        out.append(f"<h3>{html.escape(title)}</h3>")
        show = [c for c in ("feature", "peak_step", "group", *score_cols, "gt_type", "gt_purity") if c in top]
        out.append(_table(top[show], left=("group", "gt_type")))
        for f in top["feature"]:
            fc = ctx.get(str(int(f)), {})
            if not fc:
                continue
            last = sorted(fc, key=lambda s: int(s))[-1]
            link = f'analysis/browser/index.html#feature-{int(f)}'
            out.append(f'<p>Feature <a href="{link}">{int(f)}</a>, snapshot step {last}:</p>')
            out += [_context_html(c) for c in fc[last][:per_feature]]
    return "".join(out)


def _quality_section(run: Path) -> str:
    ev = _json(run / "crosscoder" / "eval.json")
    out = []
    if ev:
        df = pd.DataFrame({k: ev[k] for k in ("sources", "fvu", "l0", "dead_frac") if k in ev})
        out.append(_table(df, left=("sources",)))
    else:
        out.append('<p class="muted">(crosscoder not evaluated)</p>')
    out.append(_img(run / "crosscoder" / "quality.png", "crosscoder quality per snapshot"))
    return "".join(out)


def _geometry_section(run: Path) -> str:
    figs = sorted((run / "figures").glob("geometry_*.png"))
    if not figs:
        return '<p class="muted">(geometry not computed)</p>'
    return "".join(f"<h3>{html.escape(p.stem.removeprefix('geometry_'))}</h3>{_img(p, p.stem)}" for p in figs)


def _numbers_section(run: Path) -> str:
    """The number helix across snapshots (evolution.numbers), when the numbers stage ran."""
    data = _json(run / "numbers.json")
    if not data or not data.get("steps"):
        return '<p class="muted">(numbers stage not run: the corpus has no number tokens)</p>'
    L, hooks = data["report_layer"], data["hooks"]
    em = data["emergence"]
    rows = [{"measure": "helix R² above its shuffled null", **{h: em["helix"][i] for i, h in enumerate(hooks)}}]
    rows += [{"measure": f"period T={k} above its null", **{h: v[i] for i, h in enumerate(hooks)}}
             for k, v in em["periods"].items()]
    learned = ", ".join(f"{k} learned at step {v}" for k, v in data.get("learned_steps", {}).items()) or "no learned steps"
    last = len(data["steps"]) - 1
    final = (f"final snapshot at {html.escape(hooks[L])}: helix R² {data['helix_r2'][last][L]:.3f} "
             f"(null {data['shuffled_r2_null'][last][L]:.3f}, PCA {data['pca_r2'][last][L]:.3f}, "
             f"linear {data['linear_r2'][last][L]:.3f}, random periods {data['random_periods_r2'][last][L]:.3f})")
    return (f"<p>Generalized helix (Kantamneni &amp; Tegmark 2025) fitted to the number tokens' residual stream; "
            f"{html.escape(learned)}; {final}. Emergence = first step from which the value stays above its "
            f"shuffled-number null (None: not above at the last snapshot).</p>"
            + _img(run / "figures" / "numbers.png", "number helix") + _table(pd.DataFrame(rows), left=("measure",)))


def _interventions_section(run: Path) -> str:
    """Linear replacement / removal of each block beside its linearity (interventions.json), the pruning
    curve and the logit lens."""
    data = _json(run / "interventions.json")
    if not data or not data.get("steps"):
        return '<p class="muted">(the interventions stage is off in this recipe: set [interventions] enabled = true '\
               'or run `feature-evolution interventions RUN`)</p>'
    last = data["steps"][-1]
    until = data.get("replaceable_until", {})
    ci = lambda r: f"{r['delta']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]"  # noqa: E731
    rows = [{"block": b["block"], "linearity": round(b["linearity"], 4) if b["linearity"] is not None else None,
             "linearity w/o residual": None if b["linearity_no_residual"] is None else round(b["linearity_no_residual"], 4),
             "held-out R² of the map": round(b["r2_heldout"], 4), "Δloss linear [CI]": ci(b["linear"]),
             "Δloss removed [CI]": ci(b["identity"]),
             "not replaceable (linear) from step": (until.get("linear") or [None] * 99)[b["block"]],
             "not replaceable (removed) from step": (until.get("identity") or [None] * 99)[b["block"]]}
            for b in data["snapshots"][str(last)]["blocks"]]
    out = [f"<p>At the last snapshot (step {last}; base loss {data['snapshots'][str(last)]['base_loss']:.4f} nats/token). "
           f"\"Not replaceable from step\": the first step from which on the CI of Δloss lies above "
           f"{data.get('tolerance', 0.05)} nats/token (empty: replaceable at the last snapshot).</p>",
           _table(pd.DataFrame(rows).astype(object).where(pd.DataFrame(rows).notna(), "—"), left=("block",))]
    spikes = (_json(run / "spikes.json") or {}).get("spikes")
    if spikes is not None:
        cols = ("start", "peak", "end", "height", "snapshot_before", "snapshot_after", "id_twonn_before", "id_twonn_after")
        out.append(f"<h3>Loss spikes in pre-training ({len(spikes)}; rule in evolution/interventions/spikes.py) "
                   "and ID per layer around each</h3>")
        if spikes:
            df = pd.DataFrame([{c: (str([round(v, 1) for v in sp[c]]) if isinstance(sp.get(c), list) else sp.get(c))
                                for c in cols} for sp in spikes])
            out.append(_table(df.astype(object).where(df.notna(), "—")))
    for name, alt in [("interventions_delta", "Δloss per block against step"), ("interventions_pruning", "greedy pruning"),
                      ("logit_lens", "logit lens, layer × step")]:
        if (run / "figures" / f"{name}.png").exists():
            out.append(f"<h3>{html.escape(alt)}</h3>{_img(run / 'figures' / f'{name}.png', alt)}")
    return "".join(out)


def _config_section(run: Path) -> str:
    cfg = _json(run / "run.json")
    stages = _json(run / "stages.json") or {}
    out = []
    if stages:
        rows = [{"stage": k, "seconds": round(v.get("seconds", 0), 1), "key": v.get("key", "")} for k, v in stages.items()]
        out.append(_table(pd.DataFrame(rows), left=("stage", "key")))
    out.append(f"<pre>{html.escape(json.dumps(cfg, indent=2)) if cfg else '(no run.json)'}</pre>")
    return "".join(out)


SECTIONS = (
    ("phases", "Phase map: statistical vs feature phase", _phase_section),
    ("loss", "Loss against unigram / bigram references", _loss_section),
    ("timelines", "Feature timelines", _features_section),
    ("peaks", "Peak steps and the turning point", _peak_section),
    ("hierarchy", "The learning hierarchy: when each type and mechanism emerges", _hierarchy_section),
    ("types", "Top features per type", _types_section),
    ("quality", "Crosscoder quality per snapshot", _quality_section),
    ("geometry", "Layer geometry across snapshots", _geometry_section),
    ("numbers", "Number representations: the helix across snapshots", _numbers_section),
    ("interventions", "Linearity as an intervention: blocks replaced by their linear map or removed", _interventions_section),
    ("config", "Resolved configuration and stage timings", _config_section),
)


def _warnings_head(run: Path) -> str:
    """The crosscoder's quality verdict at the head of the page when the dictionary is degenerate."""
    q = (_json(run / "crosscoder" / "eval.json") or {}).get("quality") or {}
    if not q.get("degenerate"):
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in q.get("warnings", []))
    return ('<div class="warn"><b>The crosscoder is degenerate</b> (evolution/crosscoder/quality.py); every reading '
            f"below comes from it:<ul>{items}</ul></div>")


def build_report(run_dir: str | Path) -> Path:
    """Write `report.html` into the run directory from whatever stages have produced."""
    run = Path(run_dir)
    nav = "".join(f'<a href="#{sid}">{html.escape(title.split(":")[0])}</a>' for sid, title, _ in SECTIONS)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{fn(run)}</section>' for sid, title, fn in SECTIONS)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>feature-evolution: {html.escape(run.name)}</title>"
        f"<style>{_CSS}</style></head><body><h1>feature-evolution run <code>{html.escape(run.name)}</code></h1>"
        f"<nav>{nav}</nav>{_warnings_head(run)}{body}</body></html>"
    )
    out = run / "report.html"
    write_text(out, page)
    return out


def report_stage(ctx) -> None:
    build_report(ctx.run_dir)
