"""Harvest and stream with real (tiny, random, seeded) HookedTransformers, checked against run_with_cache."""

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crosscoders.harvest import harvest, keep_mask, measure_scales, model_acts, stop_layer
from crosscoders.store import ActivationStore

HOOK = "blocks.0.hook_resid_post"
BOS = 0


def tiny(seed: int) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=12, d_head=8, n_heads=2, d_mlp=32, d_vocab=40,
                                  act_fn="gelu", normalization_type="LN", seed=seed,
                                  positional_embedding_type="rotary", rotary_dim=4)
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def models():
    return [tiny(s) for s in range(3)]


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 39, (10, 12), generator=g)
    t[:, 0] = BOS
    t[3, 9:] = 39  # right padding on one row
    return t


def _reference(models, tokens, hook=HOOK):
    """Independent reference: full forward passes with run_with_cache."""
    return torch.stack([m.run_with_cache(tokens)[1][hook] for m in models], 2)  # [n_seq, seq, S, d]


def _read_all(store: ActivationStore):
    parts = [store.load_shard(i) for i in range(len(store.shard_sizes))]
    return (torch.cat([p["acts"] for p in parts]).float(), torch.cat([p["tokens"] for p in parts]),
            torch.cat([p["positions"] for p in parts]))


def test_stop_layer_and_mask():
    assert stop_layer("blocks.3.hook_resid_post") == 4 and stop_layer("hook_embed") == 0
    assert stop_layer("ln_final.hook_normalized") is None
    t = torch.tensor([[0, 5, 0, 7, 9, 9]])
    assert keep_mask(t).tolist() == [[False, True, True, True, True, True]]
    assert keep_mask(t, bos_token_id=0, pad_token_id=9).tolist() == [[False, True, False, True, False, False]]


@pytest.mark.parametrize("strategy", ["chunk", "snapshot"])
def test_store_equals_run_with_cache(tmp_path, models, tokens, strategy):
    loaders = [lambda m=m: m for m in models]
    store = harvest(loaders, tokens, HOOK, tmp_path, sources=["s0", "s1", "s2"], batch_size=3, dtype="float32",
                    shard_seqs=4, strategy=strategy, pad_token_id=39, progress=False)
    assert store.manifest["complete"] and len(store.shard_sizes) == 3 and not (tmp_path / ".parts").exists()
    acts, toks, pos = _read_all(store)
    ref = _reference(models, tokens)
    keep = keep_mask(tokens, pad_token_id=39)
    assert len(acts) == int(keep.sum()) == 10 * 11 - 3
    assert (pos % 12 != 0).all()  # BOS positions excluded
    assert torch.equal(toks, tokens.flatten()[pos])
    torch.testing.assert_close(acts, ref.flatten(0, 1)[pos], rtol=1e-5, atol=1e-5)
    assert store.verify()["ok"] and store.sources == ["s0", "s1", "s2"]
    torch.testing.assert_close(store.scales, measure_scales([acts], 10_000), rtol=1e-5, atol=0)


def test_both_strategies_give_identical_bytes(tmp_path, models, tokens):
    a = harvest(models, tokens, HOOK, tmp_path / "a", shard_seqs=3, progress=False)
    b = harvest([lambda m=m: m for m in models], tokens, HOOK, tmp_path / "b", shard_seqs=3, progress=False)
    assert b.manifest["shards"] == a.manifest["shards"] and a.manifest["dtype"] == "bfloat16"


def test_several_hooks_in_one_pass(tmp_path, models, tokens):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"]
    stores = harvest(models, tokens, hooks, tmp_path, dtype="float32", shard_seqs=5, progress=False)
    ref = _reference(models, tokens, hooks[1])
    acts, _, pos = _read_all(stores[hooks[1]])
    torch.testing.assert_close(acts, ref.flatten(0, 1)[pos], rtol=1e-5, atol=1e-5)
    assert (tmp_path / hooks[0] / "manifest.json").exists()


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("strategy", ["chunk", "snapshot"])
def test_resume_after_interruption_is_identical(tmp_path, models, tokens, strategy):
    calls = []

    def loader(j, fail_at=None):
        def load():
            calls.append(j)
            if fail_at is not None and len(calls) == fail_at:
                raise Crash("killed")
            return models[j]
        return load

    kw = dict(shard_seqs=3, strategy=strategy, progress=False, batch_size=2)
    ref = harvest([loader(j) for j in range(3)], tokens, HOOK, tmp_path / "ref", **kw)
    full_calls = len(calls)
    calls.clear()
    # chunk: loads per forward block of 2 sequences for models 1, 2 (model 0 loaded once) -> crash in block 2,
    # after shard 0 (sequences 0-2, blocks 0-1) is written; snapshot: crash while loading the third model,
    # after two models' parts are on disk
    with pytest.raises(Crash):
        harvest([loader(j, fail_at=7 if strategy == "chunk" else 3) for j in range(3)], tokens, HOOK,
                tmp_path / "run", **kw)
    with pytest.raises(Exception, match="unfinished"):
        ActivationStore(tmp_path / "run")
    calls.clear()
    out = harvest([loader(j) for j in range(3)], tokens, HOOK, tmp_path / "run", **kw)
    assert len(calls) < full_calls  # finished work was skipped
    assert out.manifest["shards"] == ref.manifest["shards"]
    assert out.manifest["scales"] == ref.manifest["scales"]
    for s in ref.manifest["shards"]:
        assert (tmp_path / "run" / s["file"]).read_bytes() == (tmp_path / "ref" / s["file"]).read_bytes()
    calls.clear()
    harvest([loader(j) for j in range(3)], tokens, HOOK, tmp_path / "run", **kw)  # complete: nothing to redo
    assert len(calls) <= 1


def test_processes_sharing_a_harvest_write_the_single_process_store(tmp_path, models, tokens):
    """Two processes (threads here, torchrun ranks in the harvest stage) each compute their own snapshots'
    parts and one merges: byte for byte the store one process writes."""
    import threading

    one = harvest(models, tokens, HOOK, tmp_path / "one", shard_seqs=4, strategy="snapshot", progress=False)
    barrier = threading.Barrier(2)
    loaders = [lambda m=m: m for m in models]
    kw = dict(shard_seqs=4, progress=False, wait=barrier.wait)
    other = threading.Thread(target=harvest, args=(loaders, tokens, HOOK, tmp_path / "two"),
                             kwargs=dict(own=[1], writer=False, share=(1, 2), **kw))
    other.start()
    two = harvest(loaders, tokens, HOOK, tmp_path / "two", own=[0, 2], writer=True, share=(0, 2), **kw)
    other.join()
    assert two.manifest["shards"] == one.manifest["shards"]  # sha256 of every shard
    assert not (tmp_path / "two" / ".parts").exists()


def test_cache_and_hook_methods_agree(models, tokens):
    a = model_acts(models[0], tokens, [HOOK], 4, "hooks")[HOOK]
    b = model_acts(models[0], tokens, [HOOK], 4, "cache")[HOOK]
    assert torch.equal(a, b)


def test_mismatched_model_is_a_clear_error(tmp_path, models, tokens):
    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=12, d_head=4, n_heads=2, d_vocab=40, act_fn="gelu")
    with pytest.raises(ValueError, match="source 'source1'.*width 8.*gives 16"):
        harvest([models[0], HookedTransformer(cfg)], tokens, HOOK, tmp_path, progress=False)


@pytest.mark.parametrize("strategy", ["chunk", "snapshot"])
def test_forwards_run_at_batch_size_whatever_the_shard_size(tmp_path, models, tokens, strategy, monkeypatch):
    """At Pythia's shape a 64 MiB shard is one sequence (1024 · 32 · 768 · 2 B): forwards must still take
    batch_size sequences, and the manifest is not rewritten per shard."""
    import os

    import crosscoders.store_writer as writer_mod

    seen, manifests, fsyncs = [], [], []
    run = HookedTransformer.run_with_cache
    monkeypatch.setattr(HookedTransformer, "run_with_cache", lambda self, t, **kw: (seen.append(len(t)), run(self, t, **kw))[1])
    write_json = writer_mod.write_json
    monkeypatch.setattr(writer_mod, "write_json", lambda p, o: (manifests.append(p), write_json(p, o))[1])
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), fsync(fd))[1])
    loaders = [lambda m=m: m for m in models]
    out = harvest(loaders, tokens, HOOK, tmp_path, batch_size=4, shard_seqs=1, strategy=strategy,
                  progress=False)
    assert out.manifest["metadata"]["shard_seqs"] == 1 and len(out.shard_sizes) == 10
    assert sorted(seen) == [2] * 3 + [4] * 6  # 3 forwards per model, not 10 one-sequence ones
    assert len(manifests) == 2  # created, finished
    parts = 3 * 3 if strategy == "snapshot" else 0  # one per source and forward block
    assert len(fsyncs) == 10 + parts + 2  # the shards, the parts, the two manifests
    # same bytes as shards of several sequences cut from the same forwards
    ref = harvest(models, tokens, HOOK, tmp_path / "ref", batch_size=4, shard_seqs=10, progress=False)
    assert torch.equal(_read_all(out)[0], _read_all(ref)[0])


def test_ranks_merge_disjoint_shares_into_the_single_process_store(tmp_path, models, tokens, monkeypatch):
    """Three ranks (threads here, torchrun ranks in the harvest stage): each computes its snapshot's parts,
    then writes its own third of the shards; rank 0 writes the manifest once. Byte for byte one process's."""
    import threading

    import crosscoders.store_writer as writer_mod

    loaders = [lambda m=m: m for m in models]
    kw = dict(batch_size=4, shard_seqs=1, progress=False)
    one = harvest(loaders, tokens, HOOK, tmp_path / "one", **kw)
    wrote: dict[str, list[str]] = {}
    write_bytes = writer_mod.write_bytes

    def record(path, data):
        wrote.setdefault(threading.current_thread().name, []).append(path.name)
        write_bytes(path, data)

    monkeypatch.setattr(writer_mod, "write_bytes", record)
    barrier = threading.Barrier(3)
    ranks = [threading.Thread(target=harvest, name=f"rank{r}", args=(loaders, tokens, HOOK, tmp_path / "three"),
                              kwargs=dict(own=[r], writer=False, share=(r, 3), wait=barrier.wait, **kw))
             for r in (1, 2)]
    for t in ranks:
        t.start()
    threading.current_thread().name, name = "rank0", threading.current_thread().name
    try:
        three = harvest(loaders, tokens, HOOK, tmp_path / "three", own=[0], share=(0, 3), wait=barrier.wait, **kw)
    finally:
        threading.current_thread().name = name
    for t in ranks:
        t.join()
    shares = [set(wrote[f"rank{r}"]) for r in range(3)]
    assert all(shares) and sum(map(len, shares)) == len(set().union(*shares)) == 10  # disjoint, every shard
    assert three.manifest == {**one.manifest}  # every shard's sha256, the scales, the metadata
    for s in one.manifest["shards"]:
        assert (tmp_path / "three" / s["file"]).read_bytes() == (tmp_path / "one" / s["file"]).read_bytes()
    assert not (tmp_path / "three" / ".parts").exists() and not list((tmp_path / "three").glob("*.jsonl"))


@pytest.mark.parametrize("pinned", ["fp32", "bf16"])
def test_manifest_records_the_forward_precision(tmp_path, models, tokens, monkeypatch, pinned):
    monkeypatch.setenv("CROSSCODERS_AUTO_PRECISION", pinned)
    store = harvest(models, tokens[:2], HOOK, tmp_path, progress=False)  # autocast="auto"
    assert store.manifest["metadata"]["forward"] == {"autocast": "auto", "precision": pinned, "device": "cpu",
                                                     "store_dtype": "bfloat16"}
    none = harvest(models, tokens[:2], HOOK, tmp_path / "none", autocast="none", dtype="float32", progress=False)
    assert none.manifest["metadata"]["forward"]["precision"] == "fp32"
    # and it is what was used: the stored values are the recorded precision's forwards
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=pinned == "bf16"):
        ref = _reference(models, tokens[:2])
    keep = keep_mask(tokens[:2])
    assert torch.equal(_read_all(store)[0], ref[keep].bfloat16().float())
