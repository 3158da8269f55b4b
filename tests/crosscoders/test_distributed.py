"""torch.distributed crosscoder training (gloo ranks on this CPU, launched with torchrun): data parallel,
source parallel and both end in single-process training's weights with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosscoders.distributed import _state_bytes, state_bytes
from crosscoders.model import Crosscoder
from crosscoders.store_writer import StoreWriter
from crosscoders.synthetic import PlantedFeatures, SyntheticConfig
from crosscoders.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]
TRUTH = PlantedFeatures(SyntheticConfig(n_sources=4, d_in=8, n_features=12, seed=5))
TOL = 1e-4  # float32 sums in another order over 20 Adam steps
# fp32 on every side: `autocast = "auto"` picks bf16 where the CPU has bf16 units (an AMD EPYC with AVX-512-BF16
# measured 1.4-2.5x), and its rounding, not the parallel rules, then sets the difference (1e-3 to 0.04 here)


def make_store(path: Path, n_sources: int = 4) -> Path:
    w = StoreWriter(path, [f"step{i}" for i in range(n_sources)], "blocks.0.hook_resid_post", d_in=8, dtype="float32")
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        # 1536 distinct tokens, more than the 20 x 64 a test reads (a token met twice in one batch ties with
        # itself at BatchTopK's cut; both sides now break such ties by index, tests/crosscoders/test_losses.py)
        x = TRUTH.batch(i, 256)[:, :n_sources]
        w.add(x + 1e-3 * torch.randn(x.shape, generator=g), torch.arange(256))
    w.finish()
    return path


def torchrun(n: int, args: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=n -m crosscoders.train ARGS` on gloo, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "crosscoders.train", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"torchrun failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


def flags(store: Path, out: Path, *extra: str) -> list[str]:
    return ["--store", str(store), "--out", str(out), "--steps", "20", "--batch-size", "64", "--lr", "3e-3",
            "--d-sae", "32", "--progress", "false", "--checkpoint-every", "5", "--autocast", "none", *extra]


def max_diff(a: Crosscoder, b: Crosscoder) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


SCHEMES = {
    "relu": ["--activation", "relu"],
    "jumprelu_per_source_tanh_quad": ["--activation", "jumprelu", "--gate", "per_source", "--sparsity", "tanh_quad",
                                      "--sparsity-coef", "0.3"],
    "jumprelu_per_source_tanh_joint": ["--activation", "jumprelu", "--gate", "per_source"],  # the default penalty
    "batchtopk_auxk": ["--activation", "batchtopk", "--k", "4", "--dead-tokens", "64"],
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("source_parallel", [1, 2], ids=["data", "source"])
def test_two_ranks_equal_one_process(tmp_path, scheme, source_parallel):
    store = make_store(tmp_path / "acts")
    extra = SCHEMES[scheme]
    single = train_main(flags(store, tmp_path / "one", *extra))
    torchrun(2, flags(store, tmp_path / "two", *extra, "--source-parallel", str(source_parallel)))
    two = Crosscoder.load(tmp_path / "two")
    diff = max_diff(single, two)
    print(f"max |w_1 - w_2| {scheme} source_parallel={source_parallel}: {diff:.3g}")
    (tmp_path.parent / f"diff-{scheme}-{source_parallel}.json").write_text(json.dumps(diff))
    assert diff < TOL
    assert max_diff(single, Crosscoder(single.cfg)) > 100 * TOL  # training moved the weights: not trivially equal
    # memory per rank: parameters + Adam moments, measured on each rank, against the formula and one process
    mem = json.loads((tmp_path / "two" / "parallel.json").read_text())
    one = _state_bytes(torch.load(tmp_path / "one/checkpoint/state.pt", weights_only=True))
    assert one == state_bytes(single.cfg, 1)
    assert mem["state_bytes_per_rank"] == [state_bytes(single.cfg, source_parallel)] * 2 == [mem["state_bytes_formula"]] * 2
    print(f"state bytes per rank {scheme}: 1 process {one}, 2 ranks (source_parallel={source_parallel}) "
          f"{mem['state_bytes_per_rank']}")
    log = [json.loads(x) for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 20 and log[-1]["tokens_seen"] == 20 * 64  # one writer, global token count


def test_resume_on_another_layout_is_refused_and_a_resume_is_exact(tmp_path):
    store = make_store(tmp_path / "acts")
    extra = ["--activation", "relu", "--gate", "per_source"]
    full = train_main(flags(store, tmp_path / "one", *extra))
    # a 2-rank source-parallel run stopped after 10 steps (checkpoint at step 10), resumed to 20
    two = flags(store, tmp_path / "two", *extra, "--source-parallel", "2")
    torchrun(2, two + ["--stop-at-step", "10"])
    assert torch.load(tmp_path / "two/checkpoint/state.pt", weights_only=True)["step"] == 10
    r = torchrun(2, flags(store, tmp_path / "two", *extra, "--source-parallel", "1"), check=False)
    assert r.returncode != 0 and "written by a run of 2 rank(s) (data 1 x source 2)" in r.stderr
    with pytest.raises(ValueError, match="2-rank run"):
        train_main(flags(store, tmp_path / "two", *extra))
    torchrun(2, two)  # resumes at step 10
    diff = max_diff(full, Crosscoder.load(tmp_path / "two"))
    print(f"max |w_1 - w_2| resumed source-parallel: {diff:.3g}")
    assert diff < TOL
    assert sorted(p.name for p in (tmp_path / "two/checkpoint").iterdir()) == ["shard-source1-step20.pt", "state.pt"]


def test_sources_that_do_not_split_are_refused(tmp_path):
    store = make_store(tmp_path / "acts", n_sources=3)
    r = torchrun(2, flags(store, tmp_path / "two", "--source-parallel", "2"), check=False)
    assert r.returncode != 0 and "3 sources do not split over source_parallel=2 ranks" in r.stderr
    assert not (tmp_path / "two" / "checkpoint").exists()


@pytest.mark.slow
@pytest.mark.parametrize("source_parallel", [2, 4], ids=["data2xsource2", "source4"])
def test_four_ranks_equal_one_process(tmp_path, source_parallel):
    store = make_store(tmp_path / "acts")
    extra = ["--activation", "jumprelu", "--gate", "per_source", "--sparsity", "tanh_quad", "--sparsity-coef", "0.3"]
    single = train_main(flags(store, tmp_path / "one", *extra))
    torchrun(4, flags(store, tmp_path / "four", *extra, "--source-parallel", str(source_parallel)), timeout=300)
    diff = max_diff(single, Crosscoder.load(tmp_path / "four"))
    mem = json.loads((tmp_path / "four" / "parallel.json").read_text())
    print(f"4 ranks (data {4 // source_parallel} x source {source_parallel}): max |w_1 - w_4| {diff:.3g}, "
          f"state bytes per rank {mem['state_bytes_per_rank']} (1 process {state_bytes(single.cfg, 1)})")
    assert diff < TOL
    assert mem["state_bytes_per_rank"] == [state_bytes(single.cfg, source_parallel)] * 4


@pytest.mark.slow
def test_a_rank_killed_leaves_the_last_complete_checkpoint_and_the_run_resumes(tmp_path):
    import signal
    import time

    store = make_store(tmp_path / "acts")
    args = flags(store, tmp_path / "two", "--activation", "relu", "--source-parallel", "2")
    args[args.index("--steps") + 1] = "600"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "crosscoders.train", *args], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    state = tmp_path / "two/checkpoint/state.pt"
    t0 = time.time()
    while not state.exists() and time.time() - t0 < 120:
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the run (600 steps): kill rank 1 mid-step
    ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[1]), signal.SIGKILL)
    _, err = job.communicate(timeout=300)
    assert job.returncode != 0
    assert "exitcode  : -9" in err or "Signal 9" in err or "SIGKILL" in err, err[-2000:]
    ck = torch.load(state, weights_only=True)  # the committed checkpoint is whole: its shard is there
    assert 0 < ck["step"] < 600 and (state.parent / ck["shards"][1]).exists()
    print(f"killed rank 1; last complete checkpoint at step {ck['step']}")
    torchrun(2, args, timeout=300)  # resumes from it
    single_args = [a for a in args if a not in ("--source-parallel", "2")]
    single_args[single_args.index("--out") + 1] = str(tmp_path / "one")
    diff = max_diff(train_main(single_args), Crosscoder.load(tmp_path / "two"))
    print(f"max |w_1 - w_2| after kill -9 and resume: {diff:.3g}")
    assert diff < 10 * TOL


def test_source_parallel_pre_activations_are_summed_in_fp32_under_bf16():
    """The partial pre-activations all-reduced over the source group are fp32 (one process accumulates its one
    GEMM in fp32), and the result has the dtype one process returns."""
    from crosscoders.config import CrosscoderConfig
    from crosscoders.distributed import ShardedCrosscoder
    from crosscoders.mesh import Mesh

    mesh = Mesh(rank=0, world=2, data=1, source=2, data_rank=0, source_rank=0)
    reduced = []
    mesh.sum_sources = lambda t: reduced.append(t.dtype) or 2 * t  # this rank's part twice: a stand-in peer
    cfg = CrosscoderConfig(n_sources=4, d_in=8, d_sae=16, activation="relu")
    m = ShardedCrosscoder(cfg, mesh)
    x = torch.randn(5, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre = m.pre_acts(x)
        one = Crosscoder(cfg).pre_acts(torch.randn(5, 4, 8))
    assert reduced == [torch.float32] and pre.dtype == one.dtype == torch.bfloat16


def gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_devices_this_machine_lacks_are_one_clear_error(monkeypatch, tmp_path):
    from crosscoders.errors import UserError
    from crosscoders.mesh import check_device, resolve_nproc

    gpus(monkeypatch, 0)
    with pytest.raises(UserError, match="no usable CUDA GPU"):
        check_device("cuda")
    assert resolve_nproc("auto", "cpu") == 1 and check_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="not a torch device"):
        check_device("gpu")
    gpus(monkeypatch, 2)
    assert resolve_nproc("auto", "cuda") == 2 and resolve_nproc("auto", "cpu") == 1 and resolve_nproc(2, "cuda") == 2
    with pytest.raises(UserError, match="has 2 CUDA GPU"):
        check_device("cuda:3")
    with pytest.raises(UserError, match="4 ranks on device 'cuda' but this machine has 2"):
        resolve_nproc(4, "cuda")
    # the trainer refuses before it asks for a batch (a stream would run the snapshot models for it)
    gpus(monkeypatch, 0)
    asked = []
    with pytest.raises(UserError, match="no usable CUDA GPU"):
        from crosscoders.config import TrainConfig
        from crosscoders.train import train
        train(TrainConfig(device="cuda", steps=2, progress=False), lambda s: asked.append(s) or iter([]), tmp_path)
    assert asked == []


def test_each_rank_takes_its_gpu_and_the_barrier_timeout_is_generous(monkeypatch):
    import crosscoders.mesh as M

    gpus(monkeypatch, 2)
    calls = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(M.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(M.torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    monkeypatch.setattr(M.dist, "init_process_group", lambda backend, timeout: calls.update(backend=backend, timeout=timeout))
    monkeypatch.setattr(M.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(M.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(M.dist, "new_group", lambda ranks: tuple(ranks))
    mesh = M.Mesh.init(2, device="cuda")
    assert mesh.device == "cuda:1" and calls["set_device"] == 1 and calls["backend"] == "nccl"
    assert calls["timeout"].total_seconds() >= 3600  # rank 0's merge of a Pythia-scale store outlasts 10 minutes
    M.Mesh.init(2, device="cuda", timeout_s=60)
    assert calls["timeout"].total_seconds() == 60
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(M.UserError, match="4 ranks on device 'cuda' but this machine has 2"):
        M.Mesh.init(4, device="cuda")
