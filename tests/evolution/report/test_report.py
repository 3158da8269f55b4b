"""The run report: self-contained, every section with real content, renders in headless Chromium."""

from __future__ import annotations

import re

from tests.chromium import render, requires_chromium

SECTIONS = ["phases", "loss", "timelines", "peaks", "types", "quality", "geometry", "config"]


def test_report_is_self_contained_with_every_section(tiny_run):
    _, run, _ = tiny_run
    page = (run / "report.html").read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page, sid
    # figures are embedded, so the page works when moved or mailed
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(srcs) >= 10 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "not computed" not in page, "a stage's output is missing from the report"
    assert "Turning point: step" in page and "phase boundary" in page.lower()


@requires_chromium
def test_report_renders_in_chromium(tiny_run):
    _, run, _ = tiny_run
    dom, errors = render(run / "report.html")
    assert errors == []
    assert dom.count("<img") >= 10
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom
