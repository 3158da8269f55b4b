"""The stage runner redoes exactly the stages whose config or inputs changed."""

from types import SimpleNamespace

from evolution.context import RunContext
from evolution.pipeline import Stage, run_stages


def _ctx(run_dir, a_cfg=None, b_cfg=None):
    return RunContext(SimpleNamespace(run_dir=run_dir, a=a_cfg, b=b_cfg, c={}))


def _chain(run_dir, calls, a_cfg, b_cfg):
    def mk(name):
        def run(ctx):
            calls.append(name)
            (ctx.run_dir / f"{name}.out").write_text(name)

        return run

    ctx = _ctx(run_dir, a_cfg, b_cfg)
    return ctx, [
        Stage("a", mk("a"), "a", outputs=lambda c: ["a.out"]),
        Stage("b", mk("b"), "b", inputs=lambda c: ["a"], outputs=lambda c: ["b.out"]),
        Stage("c", mk("c"), "c", inputs=lambda c: ["b"], outputs=lambda c: ["c.out"]),
    ]


def _run(chain, **kw):
    ctx, stages = chain
    return run_stages(ctx, stages, log=lambda s: None, **kw)


def test_cached_then_invalidated(tmp_path):
    calls: list[str] = []
    _run(_chain(tmp_path, calls, {"x": 1}, {"y": 1}))
    assert calls == ["a", "b", "c"]
    calls.clear()
    _run(_chain(tmp_path, calls, {"x": 1}, {"y": 1}))
    assert calls == []
    # b's config changed: b and everything downstream reruns, a does not.
    _run(_chain(tmp_path, calls, {"x": 1}, {"y": 2}))
    assert calls == ["b", "c"]
    calls.clear()
    # an upstream change propagates through the keys
    _run(_chain(tmp_path, calls, {"x": 2}, {"y": 2}))
    assert calls == ["a", "b", "c"]
    calls.clear()
    _run(_chain(tmp_path, calls, {"x": 2}, {"y": 2}), force=["c"])  # forced: redone although cached
    assert calls == ["c"]


def test_missing_output_or_interrupted_stage_reruns(tmp_path):
    calls: list[str] = []
    _run(_chain(tmp_path, calls, {}, {}))
    calls.clear()
    (tmp_path / "b.out").unlink()
    _run(_chain(tmp_path, calls, {}, {}))
    assert calls == ["b"]  # c's key did not change, and its output exists

    calls.clear()

    def boom(ctx):
        raise KeyboardInterrupt

    ctx, stages = _chain(tmp_path, calls, {}, {"y": 9})
    stages[1] = Stage("b", boom, "b", inputs=lambda c: ["a"], outputs=lambda c: ["b.out"])
    try:
        run_stages(ctx, stages, log=lambda s: None)
    except KeyboardInterrupt:
        pass
    _run(_chain(tmp_path, calls, {}, {"y": 9}))
    assert calls == ["b", "c"]


def test_clean_runs_only_when_the_key_changed(tmp_path):
    def stages(cfg, fail=False):
        def run(ctx):
            if fail:
                raise KeyboardInterrupt
            (tmp_path / "a.out").write_text("x")
            (tmp_path / "partial").mkdir(exist_ok=True)

        return _ctx(tmp_path, cfg), [Stage("a", run, "a", outputs=lambda c: ["a.out"], clean=lambda c: ["partial"])]

    _run(stages({"x": 1}))
    assert (tmp_path / "partial").exists()  # first run: nothing of another config to remove
    try:
        _run(stages({"x": 2}, fail=True))
    except KeyboardInterrupt:
        pass
    assert not (tmp_path / "partial").exists()  # the key changed: partial state of {"x": 1} removed
    (tmp_path / "partial").mkdir()
    try:
        _run(stages({"x": 2}, fail=True))
    except KeyboardInterrupt:
        pass
    assert (tmp_path / "partial").exists()  # same key after the interruption: resume, do not clean
