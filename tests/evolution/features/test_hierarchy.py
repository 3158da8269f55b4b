"""hierarchy(): planted emergence per type and mechanism, learned steps matched or not, with reasons."""

from __future__ import annotations

import numpy as np
import pandas as pd

from evolution.features.hierarchy import hierarchy, hierarchy_figure, order_check

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000, 4000]


def _features(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    plan = {"unigram": (2, None), "bigram": (5, "current_token"), "copy": (12, "induction"), "topic": (9, "context")}
    for mech, (centre, typ) in plan.items():
        for _ in range(40):
            i = int(np.clip(centre + rng.integers(-1, 2), 0, len(STEPS) - 1))
            rows.append({"emergence_step": STEPS[i], "dead": False, "gt_type": mech, "gt_lift": 3.0, "type": typ or "none"})
    for _ in range(30):  # previous-token features just before induction
        rows.append({"emergence_step": STEPS[11], "dead": False, "gt_type": "copy", "gt_lift": 1.0, "type": "previous_token"})
    return pd.DataFrame(rows)


def test_hierarchy_matches_planted_learned_steps():
    learned = {"unigram": 4, "bigram": 32, "copy": 2000, "topic": 4000}
    t = hierarchy(_features(), STEPS, learned, by="mechanism")
    r = t.set_index("group")
    assert r.loc["unigram", "median_step"] == 2 and r.loc["copy", "median_step"] == 2000
    assert r.loc["unigram", "n"] == 40 and r.loc["unigram", "ci_lo_step"] <= 2 <= r.loc["unigram", "ci_hi_step"]
    assert r.loc["unigram", "matched"] and r.loc["bigram", "matched"] and r.loc["copy", "matched"]
    assert not r.loc["topic", "matched"] and "intervals from step 4000" in r.loc["topic", "note"]
    types = hierarchy(_features(), STEPS, learned, by="type")
    ti = types.set_index("group")
    assert ti.loc["previous_token", "median_step"] == 1000 and ti.loc["induction", "learned_step"] == 2000
    checks = order_check(pd.concat([t, types]))
    assert [c["holds"] for c in checks] == [True, True, True]
    fig = hierarchy_figure(pd.concat([t, types]))
    assert len(fig.axes) == 1


def test_unmatched_mechanisms_say_why():
    t = hierarchy(_features(), STEPS, {"unigram": 4, "bigram": None, "copy": 2000, "topic": 4000, "extra": 8},
                  by="mechanism").set_index("group")
    assert "never learned" in t.loc["bigram", "note"]
    assert t.loc["extra", "n"] == 0 and "no features" in t.loc["extra", "note"]


def test_features_present_from_the_start_are_censored_not_counted_as_step_0():
    """Features whose peak run starts at the first snapshot have no observed rising edge: they are counted in
    n_from_start and left out of the median (else 'emerged at step 0' would drag the median to the start)."""
    f = _features()
    extra = pd.DataFrame([{"emergence_step": 0, "dead": False, "gt_type": "copy", "gt_lift": 3.0, "type": "induction"}] * 100)
    t = hierarchy(pd.concat([f, extra], ignore_index=True), STEPS, {"copy": 2000}, by="mechanism").set_index("group")
    assert t.loc["copy", "n"] == 40 and t.loc["copy", "n_from_start"] == 100
    assert t.loc["copy", "median_step"] == 2000 and t.loc["copy", "matched"]
    assert "present from the first snapshot" in t.loc["copy", "note"]
    only = hierarchy(extra, STEPS, {"copy": 2000}, by="mechanism").set_index("group")
    assert only.loc["copy", "n"] == 0 and "all 100 features" in only.loc["copy", "note"]


def test_context_mechanisms_need_the_token_matched_lift():
    """A copy-labelled feature with a high plain lift but a token-matched lift of 1 (a token feature) is not a
    copy feature; a bigram-labelled one is judged by the plain lift (a current-token feature carries bigrams)."""
    rows = [{"emergence_step": STEPS[12], "dead": False, "gt_type": "copy", "gt_lift": 3.0, "gt_token_lift": 2.5}] * 10
    rows += [{"emergence_step": STEPS[3], "dead": False, "gt_type": "copy", "gt_lift": 3.0, "gt_token_lift": 1.0}] * 50
    rows += [{"emergence_step": STEPS[5], "dead": False, "gt_type": "bigram", "gt_lift": 3.0, "gt_token_lift": 1.0}] * 20
    t = hierarchy(pd.DataFrame(rows), STEPS, {"copy": 2000, "bigram": 16}, by="mechanism").set_index("group")
    assert t.loc["copy", "n"] == 10 and t.loc["copy", "median_step"] == 2000 and t.loc["copy", "matched"]
    assert t.loc["bigram", "n"] == 20 and t.loc["bigram", "matched"]


def test_peak_readout_uses_the_peak_step_and_censors_first_snapshot_peaks():
    f = _features().assign(peak_step=lambda d: d["emergence_step"])
    f.loc[f.index[:10], "peak_step"] = 0  # ten unigram features strongest at the first snapshot
    f.loc[f["gt_type"] == "copy", "peak_step"] = STEPS[13]
    t = hierarchy(f, STEPS, {"copy": 2000, "unigram": 4}, by="mechanism", at="peak").set_index("group")
    assert (t["at"] == "peak").all()
    assert t.loc["copy", "median_step"] == STEPS[13] and t.loc["copy", "matched"]  # 3000 is one interval from 2000
    assert t.loc["unigram", "n_from_start"] == 10 and t.loc["unigram", "n"] == 30
    assert "median peak" in hierarchy(f.assign(peak_step=STEPS[-1]), STEPS, {"unigram": 4}, by="mechanism",
                                      at="peak").set_index("group").loc["unigram", "note"]


def test_learning_onset_is_the_ten_percent_point_of_the_final_fall():
    from evolution.sources.learning import learning_onsets

    steps = [0, 10, 20, 40, 80, 160, 320]
    rows = [{"step": s, "eval_loss_by_mechanism": {"copy": c, "topic": t, "flat": 5.0 + 0.01 * (i % 2)}}
            for i, (s, c, t) in enumerate(zip(steps, [6.0, 6.0, 5.5, 4.0, 3.0, 2.0, 2.0],
                                              [6.0, 7.0, 7.0, 6.85, 6.0, 5.0, 5.0], strict=True))]
    on = learning_onsets(rows)
    assert on["copy"] == 20        # 6.0 - 0.1 * 4.0 = 5.6: first reached at 20 (5.5)
    assert on["topic"] == 80       # from its high point 7.0 (after the rise): 7.0 - 0.2 = 6.8; 6.85 at 40 is not yet
    assert on["flat"] is None      # a 0.01-nat wobble is no learning
    t = hierarchy(_features(), STEPS, {"copy": 4000}, by="mechanism", onsets={"copy": 1000}).set_index("group")
    assert not t.loc["copy", "matched"] and t.loc["copy", "matched_onset"] and t.loc["copy", "onset_step"] == 1000
