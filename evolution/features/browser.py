"""A static, self-contained HTML feature browser per run: `analysis/browser/index.html`.

One file, no server, no network: the data (feature table, rel-norm and cosine timelines, top
contexts) is embedded as JSON in the page and drawn by a small script (inline SVG timelines), so the
page opens from `file://` and can be mailed around. The page's table sorts by any column (click a
header) and filters by a search box, a group and an alive switch; URL parameters set the initial view
(`?sort=peak_step&desc=1&group=late-rising&q=induction&alive=0`) and `#feature-<i>` opens a feature,
which is how `report.html` links into it.

Top contexts come from the probes as `analysis/contexts.json` (docs/architecture.md):
`{"<feature>": {"<step>": [{"tokens": [str, ...], "highlight": j, "activation": a}, ...]}}`;
`text_tokens` is accepted as a synonym of `tokens`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from crosscoders.io import write_text
from evolution.features.hierarchy import clear_mechanism
from evolution.features.plots import TYPE_SCORE_COLUMNS
from evolution.features.timelines import GROUPS, Timelines

TEMPLATE = Path(__file__).parent / "templates" / "browser.html"
TABLE_COLUMNS = ("feature", "peak_step", "emergence_step", "fade_step", "max_norm", "group", "turn_step", "type",
                 *TYPE_SCORE_COLUMNS, "true_type", "gt_purity")
LABELS = {"feature": "feature", "peak_step": "peak step", "emergence_step": "emerges", "fade_step": "fades",
          "max_norm": "max norm", "turn_step": "turn step", "type": "type",
          **{c: c.removeprefix("type_score_").replace("_", "-") + " score" for c in TYPE_SCORE_COLUMNS},
          "true_type": "true type", "gt_purity": "purity"}


def _clean(v: Any) -> Any:
    """JSON-safe scalar: NaN/NA -> null, numpy scalars -> Python."""
    if v is None or v is pd.NA:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _round(rows: list[list[float]], nd: int = 3) -> list[list[float]]:
    return [[round(float(x), nd) for x in r] for r in rows]


def browser_data(tl: Timelines, features: pd.DataFrame, contexts: dict | None = None,
                 title: str = "Feature browser", max_rows: int = 1000, logit_effects: dict | None = None,
                 gate: str = "shared") -> dict:
    """The JSON the page embeds (see the module docstring for the contexts' shape)."""
    if len(features) != tl.d_sae or list(features["feature"]) != list(range(tl.d_sae)):
        raise ValueError(f"feature table must have one row per feature 0..{tl.d_sae - 1} in order")
    if "gt_type" in features:  # the planted mechanism, where the feature is clearly of it (token-matched lift)
        features = features.assign(true_type=clear_mechanism(features))
    cols = [c for c in TABLE_COLUMNS if c in features]
    numeric = {c: pd.api.types.is_numeric_dtype(features[c]) and c != "group" for c in cols}
    rows = [{c: _clean(v) for c, v in zip([*cols, "dead"], vals, strict=True)}
            for vals in features.reindex(columns=[*cols, "dead"]).itertuples(index=False, name=None)]
    return {
        "title": title,
        "steps": list(tl.steps),
        "turning_point": {k: tl.turning.get(k) for k in ("step", "index", "used", "reason")},
        "turning_verdict": tl.turning_verdict,
        # under the shared gate a feature's per-snapshot activations differ only by a scale: one list of contexts
        "contexts_per_snapshot": gate == "per_source",
        "columns": [{"key": c, "label": LABELS.get(c, c), "numeric": numeric[c]} for c in cols],
        "features": rows,
        "rel_norms": _round(tl.rel_norms.tolist()),
        "cos_to_final": _round(tl.cos_to_final.tolist()),
        "group_meanings": GROUPS,
        "contexts": contexts or {},
        "max_rows": max_rows,
        # analysis/logit_effects.json (the interventions stage): a table per selected snapshot
        "logit_effects": logit_effects or {},
    }


def render_html(data: dict) -> str:
    # "</" inside a <script> block would end it early (a token "</script>" in a context): escape it
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return TEMPLATE.read_text(encoding="utf-8").replace("/*__DATA__*/", blob, 1)


def write_browser(tl: Timelines, features: pd.DataFrame, out_path: str | Path, contexts: dict | None = None,
                  title: str = "Feature browser", max_rows: int = 1000, logit_effects: dict | None = None,
                  gate: str = "shared") -> Path:
    """Write the page (atomically) and return its path. `gate`: the crosscoder's (top contexts per snapshot
    only where the per-source gate makes them differ)."""
    out_path = Path(out_path)
    write_text(out_path, render_html(browser_data(tl, features, contexts, title, max_rows, logit_effects, gate)))
    return out_path


def load_contexts(path: str | Path) -> dict | None:
    """`analysis/contexts.json` when the probes wrote it, else None."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_logit_effects(path: str | Path, d_sae: int) -> dict | None:
    """`analysis/logit_effects.json` when the interventions stage wrote it for a crosscoder of this width."""
    data = load_contexts(path)
    return data if data and len(data.get("features", {})) == d_sae else None
