"""The recipe doors of scaling up: `[harvest] mode = "stream"` (no activation store) and `[parallel]` (the
crosscoder stage as torchrun gloo ranks) give single-process training's weights."""

from __future__ import annotations

import json

import pytest
import torch

from crosscoders.dataclass_cli import replace
from crosscoders.model import Crosscoder
from evolution.pipeline import run_study
from evolution.recipe import load_recipe
from tests.conftest import TINY_RECIPE

TOL = 1e-4


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    base = load_recipe(TINY_RECIPE, root=str(root), name="base")
    run_study(base, only=("pretrain",))
    from evolution.sources.snapshots import local_steps

    return root, base, local_steps(base.run_dir / "snapshots")[:4]


def _run(snapshots, name: str, nproc: int = 1, source_parallel: int = 1, mode: str = "stream",
         activation: str = "batchtopk"):
    root, base, steps = snapshots
    cfg = replace(base, name=name,
                  snapshots=replace(base.snapshots, source=f"local:{base.run_dir / 'snapshots'}", steps=steps),
                  harvest=replace(base.harvest, mode=mode, stream_buffer_seqs=4, stream_shards=2),
                  train=replace(base.train, steps=24, batch_size=32, checkpoint_every=8,
                                crosscoder=replace(base.train.crosscoder, activation=activation)),
                  parallel=replace(base.parallel, nproc_per_node=nproc, source_parallel=source_parallel))
    run_study(cfg, only=("crosscoder",))
    return cfg, Crosscoder.load(cfg.run_dir / "crosscoder")


def _diff(a: Crosscoder, b: Crosscoder) -> float:
    return max((v - b.state_dict()[k]).abs().max().item() for k, v in a.state_dict().items())


def test_stream_mode_writes_no_store_and_trains(snapshots):
    cfg, model = _run(snapshots, "stream1")
    acts = cfg.run_dir / "activations" / cfg.harvest.hook
    assert [p.name for p in acts.iterdir()] == ["manifest.json"]  # no shards: zero disk
    m = json.loads((acts / "manifest.json").read_text())
    assert m["format"] == "feature-evolution/stream" and len(m["scales"]) == 4
    torch.testing.assert_close(model.norm_scale, torch.tensor(m["scales"]))  # stored with the crosscoder
    ev = json.loads((cfg.run_dir / "crosscoder" / "eval.json").read_text())
    assert ev["sources"] == [f"step{s}" for s in snapshots[2]] and ev["fvu_mean"] < 1.0
    assert not (cfg.run_dir / "activations_eval").exists()


# data-parallel streaming is slow-only: the fast suite checks its two halves, the stream's per-rank shards in one
# process (tests/crosscoders/test_stream.py) and data-parallel training = one process (test_distributed.py)
@pytest.mark.parametrize("source_parallel", [pytest.param(1, marks=pytest.mark.slow), 2], ids=["data", "source"])
def test_two_streaming_ranks_equal_one_process(snapshots, source_parallel):
    _, one = _run(snapshots, "stream1")  # cached after the first test
    _, two = _run(snapshots, f"stream2-{source_parallel}", nproc=2, source_parallel=source_parallel)
    d = _diff(one, two)
    print(f"stream: max |w_1 - w_2| source_parallel={source_parallel}: {d:.3g}")
    assert d < TOL
    assert _diff(one, Crosscoder(one.cfg).fold_norm_scale(one.norm_scale)) > 100 * TOL  # it trained


def test_store_mode_on_two_ranks_equals_one_process(snapshots):
    # jumprelu: the tiny store's 496 tokens repeat within a batch (the reader's buffer spans epochs), and a
    # token tied with itself at BatchTopK's cut is kept once by one process, twice by the ranks
    c1, one = _run(snapshots, "store1", mode="store", activation="jumprelu")
    c2, two = _run(snapshots, "store2", nproc=2, source_parallel=2, mode="store", activation="jumprelu")
    # the harvest on 2 ranks (2 snapshots each) wrote the store one process writes, shard for shard
    for sub in ("activations", "activations_eval"):
        m1, m2 = (json.loads((c.run_dir / sub / c.harvest.hook / "manifest.json").read_text()) for c in (c1, c2))
        assert m1 == m2 and m1["complete"] and len(m1["sources"]) == 4
    assert not list((c2.run_dir / "activations").glob(".*source*"))  # the one-source parts are gone
    d = _diff(one, two)
    print(f"store via recipe: max |w_1 - w_2| source_parallel=2: {d:.3g}")
    assert d < TOL


def test_harvest_key_leaves_store_runs_cached():
    from types import SimpleNamespace

    from evolution.harvest import HarvestConfig
    from evolution.pipeline import _harvest_key

    def key(h):
        return _harvest_key(SimpleNamespace(harvest=h, snapshots=None))["harvest"]

    store, stream = key(HarvestConfig()), key(HarvestConfig(mode="stream", stream_shards=8))
    assert "stream" not in store and store.endswith("autocast='auto')")  # the key runs had before `mode` existed
    assert "mode='stream'" in stream and "stream_shards=8" in stream


def test_nproc_per_node_auto_is_one_rank_per_gpu_of_the_training_device(monkeypatch):
    from types import SimpleNamespace

    from crosscoders.dataclass_cli import from_dict
    from crosscoders.errors import UserError
    from evolution.crosscoder.stage import ParallelConfig, crosscoder_ranks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = SimpleNamespace(parallel=from_dict(ParallelConfig, {"nproc_per_node": "auto"}), train=SimpleNamespace(device="cuda"))
    assert crosscoder_ranks(cfg) == 4
    cfg.train.device = "cpu"
    assert crosscoder_ranks(cfg) == 1
    assert from_dict(ParallelConfig, {"nproc_per_node": "8"}).nproc_per_node == 8
    cfg = SimpleNamespace(parallel=ParallelConfig(nproc_per_node=8), train=SimpleNamespace(device="cuda"))
    with pytest.raises(UserError, match="8 ranks on device 'cuda' but this machine has 4"):
        crosscoder_ranks(cfg)
    with pytest.raises(UserError, match="a number or"):
        ParallelConfig(nproc_per_node="many")
