"""The interventions stage on the tiny study (a copy, so the shared run stays as the other tests expect):
interventions.json, figures, logit effects in the browser and the API, the report panel, resume."""

from __future__ import annotations

import json
import shutil

import pytest

from evolution.cli import main


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    _, run, _ = tiny_run
    dst = tmp_path_factory.mktemp("iv") / run.name
    shutil.copytree(run, dst)
    assert main(["interventions", "--n-eval-seqs", "16", "--n-fit-tokens", "600",
                 "--n-score-tokens", "300", "--n-bootstrap", "100", str(dst)]) == 0
    return dst


def test_interventions_json_covers_every_snapshot_block_and_mode(run_copy):
    data = json.loads((run_copy / "interventions.json").read_text())
    steps = sorted(int(p.name.removeprefix("step")) for p in (run_copy / "snapshots").iterdir())
    assert data["steps"] == steps and data["complete"]
    for s in steps:
        snap = data["snapshots"][str(s)]
        assert len(snap["blocks"]) == 2
        for b in snap["blocks"]:
            for mode in ("linear", "identity"):
                lo, hi = b[mode]["ci"]
                assert lo <= b[mode]["delta"] <= hi
                assert b[mode]["loss"] == pytest.approx(snap["base_loss"] + b[mode]["delta"])
        assert [r["k"] for r in snap["prune"]["identity"]] == [1, 2]
        ll = snap["logit_lens"]
        assert len(ll["loss"]) == 3 and ll["top1_agreement"][-1] == 1.0
        assert ll["loss"][-1] == pytest.approx(snap["base_loss"], rel=1e-6)  # the last layer is the model itself
    assert set(data["replaceable_until"]) == {"linear", "identity"}
    for name in ("interventions_delta", "interventions_pruning", "logit_lens"):
        assert (run_copy / "figures" / f"{name}.png").stat().st_size > 0


def test_logit_effects_reach_the_browser_and_the_api(run_copy):
    import evolution

    eff = json.loads((run_copy / "analysis" / "logit_effects.json").read_text())
    d_sae = json.loads((run_copy / "run.json").read_text())["train"]["crosscoder"]["d_sae"]
    assert len(eff["features"]) == d_sae and len(eff["features"]["3"][str(eff["steps"][-1])]["promoted"]) == 5
    page = (run_copy / "analysis" / "browser" / "index.html").read_text()
    assert '"logit_effects":{"steps"' in page and "logitEffectsDiv" in page
    run = evolution.load_run(run_copy)
    step = run.steps[-1]
    stored = run.logit_effects(3, step)
    computed = run.logit_effects(3, step, k=6)  # more tokens than stored: recomputed from the snapshot
    assert [t for t, _ in computed["promoted"][:5]] == [t for t, _ in stored["promoted"]]
    assert [v for _, v in computed["suppressed"][:5]] == pytest.approx([v for _, v in stored["suppressed"]], abs=1e-3)
    with pytest.raises(ValueError):
        run.logit_effects(3, step + 12345)


def test_steps_restrict_the_stage_and_the_api_computes_the_rest(tiny_run, tmp_path):
    _, run, _ = tiny_run
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    steps = sorted(int(p.name.removeprefix("step")) for p in (dst / "snapshots").iterdir())
    pick = [steps[0], steps[-1]]
    assert main(["interventions", "--n-eval-seqs", "4", "--n-fit-tokens", "300", "--n-score-tokens", "100",
                 "--n-bootstrap", "20", "--logit-lens", "false", "--steps", ",".join(map(str, pick)), str(dst)]) == 0
    data = json.loads((dst / "interventions.json").read_text())
    assert data["steps"] == pick and sorted(map(int, data["snapshots"])) == pick and data["complete"]
    eff = json.loads((dst / "analysis" / "logit_effects.json").read_text())
    assert eff["steps"] == pick
    import evolution

    run = evolution.load_run(dst)
    assert len(run.logit_effects(3, steps[1], k=2)["promoted"]) == 2  # a step left out: computed on demand
    assert main(["interventions", "--steps", str(steps[-1] + 7), str(dst)]) != 0


def test_report_panel_and_resume(run_copy, capsys):
    from evolution.report.html import build_report

    page = build_report(run_copy).read_text()
    assert "Δloss linear [CI]" in page and "Δloss per block against step" in page
    before = (run_copy / "interventions.json").read_text()
    assert main(["interventions", "--n-eval-seqs", "16", "--n-fit-tokens", "600",
                 "--n-score-tokens", "300", "--n-bootstrap", "100", str(run_copy)]) == 0
    assert json.loads((run_copy / "interventions.json").read_text())["snapshots"] == json.loads(before)["snapshots"]


def test_compare_two_runs(run_copy, tiny_run, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    geo = json.loads((other / "geometry.json").read_text())
    geo["metrics"]["linearity"] = [[None if v is None else v - 0.1 for v in row] for row in geo["metrics"]["linearity"]]
    (other / "geometry.json").write_text(json.dumps(geo))
    assert main(["compare", str(run_copy), str(other), "--out", str(tmp_path / "cmp")]) == 0
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    t = res["table"]
    a, b = t["linearity per layer, last snapshot"]
    assert [y for y in b if y is not None] == pytest.approx([x - 0.1 for x in a if x is not None], abs=1e-4)
    assert t["final held-out loss"][0] == t["final held-out loss"][1]
    assert {"loss", "geometry_linearity", "phase_boundary", "interventions_linear"} <= set(res["figures"])
    for f in res["figures"]:
        assert (tmp_path / "cmp" / f"{f}.png").stat().st_size > 0
    # a run without interventions: listed as missing, not drawn
    res2 = json.loads(json.dumps(__import__("evolution.report.compare", fromlist=["compare_runs"]).compare_runs(
        run_copy, tiny_run[1], tmp_path / "cmp2")))
    assert "interventions" in res2["missing"] and "interventions_linear" not in res2["figures"]
    assert "| final held-out loss |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_interventions_on_a_non_run_directory_is_a_one_line_error(tmp_path, capsys):
    assert main(["interventions", "--n-eval-seqs", "4", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_recipe_key_adds_the_stage_before_phases(tiny_run):
    import dataclasses

    from evolution.pipeline import study_stages

    cfg = tiny_run[0]
    assert "interventions" not in [s.name for s in study_stages(cfg)]  # off by default
    on = dataclasses.replace(cfg, interventions=dataclasses.replace(cfg.interventions, enabled=True))
    st = {s.name: s for s in study_stages(on)}
    names = list(st)
    assert names.index("evaluate") < names.index("interventions") < names.index("phases")
    assert "interventions" in st["report"].inputs(on) and "crosscoder" in st["interventions"].inputs(on)


def test_browser_shows_the_logit_effects_table_in_chromium(run_copy):
    from tests.chromium import Chromium, chromium_path

    if chromium_path() is None:
        pytest.skip("chromium not installed")
    eff = json.loads((run_copy / "analysis" / "logit_effects.json").read_text())
    with Chromium() as br:
        page = br.open(run_copy / "analysis" / "browser" / "index.html", "#feature-3")
        assert page.errors == []
        rows = page.evaluate("[...document.querySelectorAll('#logit-effects tr')].map(tr => tr.children[0].textContent)")
        last = eff["features"]["3"][str(eff["steps"][-1])]
        assert rows[1:] == [json.dumps(eff["vocab"][str(t)]) for t, _ in last["promoted"]]
        first = eff["steps"][0]
        page.evaluate(f"const s = document.getElementById('logit-step'); s.value = '{first}';"
                      "s.dispatchEvent(new Event('change'))")
        rows = page.evaluate("[...document.querySelectorAll('#logit-effects tr')].map(tr => tr.children[2].textContent)")
        assert rows[1:] == [json.dumps(eff["vocab"][str(t)]) for t, _ in eff["features"]["3"][str(first)]["suppressed"]]
        assert page.errors == []
