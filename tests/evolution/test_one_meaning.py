"""One meaning per number: on the fixture run, every number shown in two places (features.csv, summary.json,
phases.json, the browser's embedded data, report.html, the Python API) is the same number."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pandas as pd
import pytest

import evolution
from evolution.features.plots import TYPE_SCORE_COLUMNS
from evolution.features.turning import turning_verdict


@pytest.fixture(scope="module")
def outputs(tiny_run):
    _, run, _ = tiny_run
    page = (run / "analysis" / "browser" / "index.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))
    return {"run": run, "features": pd.read_csv(run / "analysis" / "features.csv"), "browser": data,
            "summary": json.loads((run / "analysis" / "summary.json").read_text()),
            "phases": json.loads((run / "phases.json").read_text()),
            "report": html.unescape((run / "report.html").read_text()), "api": evolution.load_run(run)}


def test_one_family_of_type_scores_everywhere(outputs):
    f, b = outputs["features"], outputs["browser"]
    score_like = [c for c in f if "score" in c]
    assert score_like and set(score_like) <= set(TYPE_SCORE_COLUMNS), score_like
    shown = [c["key"] for c in b["columns"] if "score" in c["key"]]
    assert shown and set(shown) <= set(TYPE_SCORE_COLUMNS)
    for c in shown:  # the browser's numbers are the table's
        ours = np.array([r[c] if r[c] is not None else np.nan for r in b["features"]], float)
        np.testing.assert_allclose(ours, f[c].to_numpy(float), rtol=0, atol=0, equal_nan=True)
    api = outputs["api"].features
    assert [c for c in api if "score" in c] == score_like
    # the type is decided by those scores: a typed feature's own score is positive
    typed = f[~f["type"].isin(["none", "inactive"])]
    assert all(typed.loc[i, f"type_score_{t}"] > 0 for i, t in typed["type"].items())


def test_the_turning_point_is_said_one_way(outputs):
    s, ph, b, run = outputs["summary"], outputs["phases"], outputs["browser"], outputs["api"]
    tp = s["turning_point"]
    sig = ph["signals"]["crosscoder_turning_point"]
    assert (sig["step"], sig["used"], sig.get("reason")) == (tp["step"], tp["used"], tp.get("reason"))
    verdict = turning_verdict(tp)
    assert s["turning_point_verdict"] == verdict == b["turning_verdict"] == run.turning_verdict
    assert s["turning_point_step"] == run.turning_point_step == (tp["step"] if tp["used"] else None)
    assert f"Turning point: {verdict}" in outputs["report"]


def test_the_phase_verdict_is_said_one_way(outputs):
    ph, rep = outputs["phases"], outputs["report"]
    if ph.get("boundary_step") is None:
        assert "boundary: inconclusive" in rep
    else:
        assert f"boundary: step {ph['boundary_step']}" in rep
    agree = set(ph.get("agree") or [])
    for name, sig in ph["signals"].items():  # each signal's row says what phases.json says of it
        row = re.search(rf"<tr><td class=\"l\">{re.escape(name)}</td>(.*?)</tr>", rep, re.S)
        assert row, name
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
        expected = ("yes" if name in agree else "no") if sig.get("used") else "not used"
        assert expected in cells, (name, cells)


def test_crosscoder_quality_is_said_one_way(outputs):
    ev = json.loads((outputs["run"] / "crosscoder" / "eval.json").read_text())
    rep = outputs["report"]
    for src, fvu in zip(ev["sources"], ev["fvu"], strict=True):
        row = re.search(rf"<tr><td class=\"l\">{src}</td>(.*?)</tr>", rep, re.S)
        assert row and f"{fvu:.4g}" in row.group(1), (src, fvu)  # the report prints 4 significant digits
