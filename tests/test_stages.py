"""The stage runner redoes exactly the stages whose config or inputs changed."""

from evolution.stages import Stage, run_stages


def _chain(run_dir, calls, a_cfg, b_cfg):
    def mk(name):
        def run():
            calls.append(name)
            (run_dir / f"{name}.out").write_text(name)

        return run

    return [
        Stage("a", mk("a"), a_cfg, outputs=["a.out"]),
        Stage("b", mk("b"), b_cfg, inputs=["a"], outputs=["b.out"]),
        Stage("c", mk("c"), {}, inputs=["b"], outputs=["c.out"]),
    ]


def test_cached_then_invalidated(tmp_path):
    calls: list[str] = []
    run_stages(tmp_path, _chain(tmp_path, calls, {"x": 1}, {"y": 1}), log=lambda s: None)
    assert calls == ["a", "b", "c"]
    calls.clear()
    run_stages(tmp_path, _chain(tmp_path, calls, {"x": 1}, {"y": 1}), log=lambda s: None)
    assert calls == []
    # b's config changed: b and everything downstream reruns, a does not.
    run_stages(tmp_path, _chain(tmp_path, calls, {"x": 1}, {"y": 2}), log=lambda s: None)
    assert calls == ["b", "c"]
    calls.clear()
    # an upstream change propagates through the keys
    run_stages(tmp_path, _chain(tmp_path, calls, {"x": 2}, {"y": 2}), log=lambda s: None)
    assert calls == ["a", "b", "c"]


def test_missing_output_or_interrupted_stage_reruns(tmp_path):
    calls: list[str] = []
    run_stages(tmp_path, _chain(tmp_path, calls, {}, {}), log=lambda s: None)
    calls.clear()
    (tmp_path / "b.out").unlink()
    run_stages(tmp_path, _chain(tmp_path, calls, {}, {}), log=lambda s: None)
    assert calls == ["b"]  # c's key did not change, and its output exists

    calls.clear()

    def boom():
        raise KeyboardInterrupt

    stages = _chain(tmp_path, calls, {}, {"y": 9})
    stages[1] = Stage("b", boom, {"y": 9}, inputs=["a"], outputs=["b.out"])
    try:
        run_stages(tmp_path, stages, log=lambda s: None)
    except KeyboardInterrupt:
        pass
    run_stages(tmp_path, _chain(tmp_path, calls, {}, {"y": 9}), log=lambda s: None)
    assert calls == ["b", "c"]


def test_clean_runs_only_when_the_key_changed(tmp_path):
    cleaned: list[str] = []

    def stages(cfg, fail=False):
        def run():
            if fail:
                raise KeyboardInterrupt
            (tmp_path / "a.out").write_text("x")

        return [Stage("a", run, cfg, outputs=["a.out"], clean=lambda: cleaned.append("a"))]

    run_stages(tmp_path, stages({"x": 1}), log=lambda s: None)
    assert cleaned == []  # first run: nothing of another config to remove
    try:
        run_stages(tmp_path, stages({"x": 2}, fail=True), log=lambda s: None)
    except KeyboardInterrupt:
        pass
    assert cleaned == ["a"]  # the key changed: partial state of {"x": 1} removed
    run_stages(tmp_path, stages({"x": 2}), log=lambda s: None)
    assert cleaned == ["a"]  # same key after the interruption: resume, do not clean
