"""The feature browser, rendered in real headless Chromium: loads clean, shows the rows, sorts, filters."""

from __future__ import annotations

import numpy as np
import pytest

from evolution.features.browser import browser_data, write_browser
from evolution.features.timelines import compute_timelines_from_W_dec
from tests.chromium import Chromium, requires_chromium
from tests.evolution.features.test_timelines import STEPS, planted_decoder

TRICKY = ["a", "</script>", "<b>x</b>", "&amp;", "\"q\"", "ü"]


@pytest.fixture(scope="module")
def page_path(tmp_path_factory):
    W_dec, _ = planted_decoder(d_sae=60, seed=7, turn_at=6)
    W_dec[:, 3] = 0  # a dead feature, hidden by default
    tl = compute_timelines_from_W_dec(W_dec, STEPS)
    df = tl.to_frame()
    rng = np.random.default_rng(0)
    df["type_score_induction"] = rng.random(len(df))
    df["gt_type"] = np.where(np.arange(len(df)) % 3 == 0, "copy", "bigram")
    contexts = {"5": {str(STEPS[-1]): [{"tokens": TRICKY, "highlight": 1, "activation": 2.5}],
                      str(STEPS[4]): [{"text_tokens": ["p", "q"], "highlight": 0, "activation": 0.5}]}}
    out = tmp_path_factory.mktemp("b")
    path = write_browser(tl, df, out / "browser" / "index.html", contexts, title="test run", gate="per_source")
    # the same under the shared gate, where every snapshot ranks the same contexts: one list, and why
    write_browser(tl, df, out / "shared" / "index.html", contexts, title="test run", gate="shared")
    return path, tl, df


def test_data_checks_feature_order():
    W_dec, _ = planted_decoder(d_sae=10, seed=1)
    tl = compute_timelines_from_W_dec(W_dec, STEPS)
    with pytest.raises(ValueError, match="one row per feature"):
        browser_data(tl, tl.to_frame().iloc[::-1])


@requires_chromium
def test_browser_renders_sorts_and_filters(page_path):
    path, tl, df = page_path
    alive = df[~df["dead"]]
    cells = "[...document.querySelectorAll('#features tbody tr')].map(tr => Number(tr.children[{k}].textContent))"
    with Chromium() as br:
        page = br.open(path)
        assert page.errors == []
        assert "test run" in page.dom
        n_rows = page.evaluate("document.querySelectorAll('#features tbody tr').length")
        assert n_rows == len(alive)
        assert page.evaluate("document.querySelectorAll('#features tbody svg polyline').length") == len(alive)
        headers = page.evaluate("[...document.querySelectorAll('#features th')].map(th => th.dataset.key)")
        assert headers[:2] == ["feature", "peak_step"] and "type_score_induction" in headers and "true_type" in headers
        assert not [h for h in headers if h.endswith("_score") and not h.startswith("type_score_")]  # one family
        # default: sorted by peak step ascending
        peaks = page.evaluate(cells.format(k=1))
        assert peaks == sorted(peaks) and sorted(peaks) == sorted(alive["peak_step"].tolist())
        # click the induction header twice: descending by induction score
        k = headers.index("type_score_induction")
        page.evaluate(f"document.querySelectorAll('#features th')[{k}].click()")
        page.evaluate(f"document.querySelectorAll('#features th')[{k}].click()")
        ids = page.evaluate(cells.format(k=0))
        assert ids == alive.sort_values(["type_score_induction", "feature"], ascending=[False, True])["feature"].tolist()
        # the search box filters (typed text goes through the input event)
        page.evaluate("const q = document.getElementById('q'); q.value = 'copy';"
                      "q.dispatchEvent(new Event('input'))")
        ids = page.evaluate(cells.format(k=0))
        assert sorted(ids) == alive[alive["gt_type"] == "copy"]["feature"].tolist()
        # the alive switch reveals the dead feature
        page.evaluate("document.getElementById('q').value=''; document.getElementById('q').dispatchEvent(new Event('input'));"
                      "document.getElementById('alive').click()")
        assert page.evaluate("document.querySelectorAll('#features tbody tr').length") == len(df)
        assert page.errors == []

        # URL parameters and the #feature anchor (what report.html links to)
        group = alive["group"].value_counts().index[0]
        page = br.open(path, f"?group={group}&sort=feature&desc=1#feature-5")
        assert page.errors == []
        ids = page.evaluate(cells.format(k=0))
        assert ids == sorted(alive[alive["group"] == group]["feature"].tolist(), reverse=True)
        assert page.evaluate("document.querySelector('#detail h2').textContent") == "Feature 5"
        marks = page.evaluate("[...document.querySelectorAll('#detail mark')].map(m => m.textContent)")
        assert marks == ["p", "</script>"]  # snapshots in step order; "</script>" escaped safely
        ctx = page.evaluate("[...document.querySelectorAll('#detail .ctx')].map(d => d.textContent)")
        assert any("".join(TRICKY) in c for c in ctx)
        assert page.evaluate("document.querySelectorAll('#detail svg line').length") == 1  # turning point mark
        assert f"turning point: {tl.turning_verdict}" in page.evaluate("document.getElementById('meta').textContent")
        page = br.open(path.parent.parent / "shared" / "index.html", "#feature-5")
        assert page.evaluate("[...document.querySelectorAll('#detail mark')].map(m => m.textContent)") == ["</script>"]
        assert "Shared gate" in page.evaluate("document.getElementById('detail').textContent")
