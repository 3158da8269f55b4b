"""Figures: each returns a Figure that saves as PNG, and shows what it claims (read back from the artists)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from evolution.features import plots
from evolution.features.timelines import compute_timelines_from_W_dec
from tests.evolution.features.test_timelines import STEPS, planted_decoder


@pytest.fixture(scope="module")
def tl():
    W_dec, _ = planted_decoder(d_sae=120, seed=4, turn_at=7)
    return compute_timelines_from_W_dec(W_dec, STEPS)


def test_heatmap_rows_sorted_by_peak(tl):
    fig = plots.plot_heatmap(tl)
    img = np.asarray(fig.axes[0].images[0].get_array())
    assert img.shape == (int((~tl.dead).sum()), len(STEPS))
    peaks = img.argmax(1)
    assert (np.diff(peaks) >= 0).all()
    assert np.allclose(img.max(1), 1.0)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == "0" and labels[-1] == str(STEPS[-1])


def test_peak_steps_bars_count_features(tl):
    fig = plots.plot_peak_steps(tl)
    heights = [p.get_height() for p in fig.axes[0].patches]
    ref = np.bincount(tl.peak_index[~tl.dead].numpy(), minlength=len(STEPS))
    assert heights == ref.tolist()
    assert fig.axes[0].get_xscale() == "symlog"


def test_cos_to_final_marks_turning_point(tl, tmp_path):
    fig = plots.plot_cos_to_final(tl)
    vlines = [line for line in fig.axes[0].lines if line.get_linestyle() == "--"]
    # the turning point's step (phases.json's), inside the planted interval, drawn where it is used
    assert vlines and vlines[0].get_xdata()[0] == tl.turning_point_step and STEPS[6] < tl.turning_point_step <= STEPS[7]
    assert tl.turning_verdict in fig.axes[0].get_legend_handles_labels()[1][-1].removeprefix("turning point: ")
    plots.save_figure(fig, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_and_type_panels(tl, tmp_path):
    fig = plots.plot_timelines_by_group(tl)
    titles = [ax.get_title() for ax in fig.axes]
    present = {g for g in tl.groups if g != "dead"}
    assert len(titles) == len(present) and all(any(t.startswith(g + " (n=") for t in titles) for g in present)
    df = tl.to_frame()
    assert plots.plot_timelines_by_type(tl, df) is None  # no type columns yet
    df["type"] = np.where(np.arange(len(df)) % 2 == 0, "previous_token", "induction")
    fig = plots.plot_timelines_by_type(tl, df)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    df2 = tl.to_frame().assign(type="previous_token")
    assert set(plots.feature_types(df2).unique()) == {"previous_token"}
    written = plots.save_all(tl, df, tmp_path)
    assert {p.name for p in written} == {*plots.FIGURES, "timelines_by_type.png"}
    assert all(p.stat().st_size > 5000 for p in written)


def test_feature_types_are_the_type_column():
    df = pd.DataFrame({"type": ["previous_token", "induction", "none", "inactive"],
                       "type_score_induction": [0.0, 0.8, 0.01, float("nan")]})
    t = plots.feature_types(df)
    assert t.tolist()[:2] == ["previous_token", "induction"] and t.iloc[2:].isna().all()
    assert plots.feature_types(df.drop(columns="type")) is None  # no probes: no types, never a guess from scores
