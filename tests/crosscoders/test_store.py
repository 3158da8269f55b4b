"""Activation store: round trip, shuffled reader, resume, and a clear StoreError for each kind of damage."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from crosscoders.store import ActivationStore, StoreError
from crosscoders.store_writer import StoreWriter, shard_name, tokens_sha256

S, D = 3, 8


def _write(tmp_path, sizes=(40, 25, 33, 50), dtype="float32", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    w = StoreWriter(tmp_path, [f"step{i}" for i in range(S)], "blocks.0.hook_resid_post", D, dtype=dtype, **kw)
    all_acts, pos = [], 0
    for n in sizes:
        acts = torch.randn(n, S, D, generator=g) * torch.tensor([1.0, 3.0, 0.5])[None, :, None]
        w.add(acts, torch.arange(pos, pos + n) % 97, torch.arange(pos, pos + n))
        all_acts.append(acts)
        pos += n
    return w, torch.cat(all_acts)


def test_round_trip_manifest_and_scales(tmp_path):
    w, acts = _write(tmp_path, token_stream={"sha256": tokens_sha256(torch.arange(10))})
    store = w.finish()
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["complete"] and m["n_tokens"] == 148 and [s["n_tokens"] for s in m["shards"]] == [40, 25, 33, 50]
    assert m["sources"] == ["step0", "step1", "step2"] and m["d_in"] == D and m["version"] == 1
    # scale_s = sqrt(d_in) / mean norm, computed independently from the raw activations
    expect = math.sqrt(D) / acts.norm(dim=-1).mean(0)
    torch.testing.assert_close(store.scales, expect.float(), rtol=1e-5, atol=0)
    assert store.verify()["n_tokens"] == 148
    x = torch.cat(list(store.batches(16, seed=1, n_epochs=1, normalize=False)))
    # one epoch is a permutation of all rows: same multiset
    assert x.shape == acts.shape
    torch.testing.assert_close(x.sum(0), acts.sum(0), rtol=1e-4, atol=1e-4)
    assert not torch.equal(x, acts)  # actually shuffled
    key = lambda t: sorted(t[:, 0, 0].tolist())  # noqa: E731
    assert key(x) == key(acts)
    xn = torch.cat(list(store.batches(16, seed=1, n_epochs=1, normalize=True)))
    torch.testing.assert_close(xn.norm(dim=-1).mean(0), torch.full((S,), math.sqrt(D)), rtol=1e-4, atol=0)
    toks, pos = store.tokens()
    assert torch.equal(pos, torch.arange(148)) and torch.equal(toks, pos % 97)


def test_reader_deterministic_mixes_shards_and_resumes(tmp_path):
    _, acts = _write(tmp_path, sizes=(30,) * 8)
    store = StoreWriter(tmp_path, [f"step{i}" for i in range(S)], "blocks.0.hook_resid_post", D,
                        dtype="float32").finish()
    a = list(store.batches(20, seed=3, n_epochs=3, shuffle_buffer_tokens=90))
    b = list(store.batches(20, seed=3, n_epochs=3, shuffle_buffer_tokens=90))
    c = list(store.batches(20, seed=4, n_epochs=3, shuffle_buffer_tokens=90))
    assert len(a) == 36 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    # a batch mixes rows from several shards (shard of a row = its index // 30)
    row_of = {tuple(acts[i, 0, :3].tolist()): i // 30 for i in range(len(acts))}
    raw = list(store.batches(20, seed=3, n_epochs=1, normalize=False, shuffle_buffer_tokens=90))
    shards_in_first = {row_of[tuple(r[0, :3].tolist())] for r in raw[0]}
    assert len(shards_in_first) >= 2
    # resuming at batch 7 gives exactly the tail, also in the infinite stream
    tail = list(store.batches(20, seed=3, n_epochs=3, shuffle_buffer_tokens=90, start_batch=7))
    assert len(tail) == 29 and all(torch.equal(x, y) for x, y in zip(a[7:], tail, strict=True))
    inf = store.batches(20, seed=3, shuffle_buffer_tokens=90, start_batch=30)
    assert torch.equal(next(inf), a[30])


def test_writer_resume_and_header_mismatch(tmp_path):
    w, _ = _write(tmp_path, sizes=(10, 12))
    w2 = StoreWriter(tmp_path, [f"step{i}" for i in range(S)], "blocks.0.hook_resid_post", D, dtype="float32")
    assert w2.n_shards == 2 and w2.n_tokens == 22 and w2.last_position == 21
    with pytest.raises(StoreError, match="manifest.json.*different \\['d_in'\\]"):
        StoreWriter(tmp_path, [f"step{i}" for i in range(S)], "blocks.0.hook_resid_post", D + 1, dtype="float32")
    with pytest.raises(StoreError, match="unfinished"):
        ActivationStore(tmp_path)
    w3 = StoreWriter(tmp_path, ["a"], "h", D, resume=False)
    assert w3.n_shards == 0 and not (tmp_path / shard_name(0)).exists()


def test_nan_is_refused_at_write_and_at_read(tmp_path):
    w = StoreWriter(tmp_path / "a", ["x"], "h", 4, dtype="float16")
    acts = torch.ones(5, 1, 4)
    acts[2, 0, 1] = float("nan")
    with pytest.raises(StoreError, match="non-finite.*row 2"):
        w.add(acts, torch.zeros(5))
    with pytest.raises(StoreError, match="non-finite"):  # overflows fp16
        w.add(torch.full((5, 1, 4), 1e6), torch.zeros(5))
    # a NaN smuggled into a shard (with a matching checksum) is still caught when read
    w = StoreWriter(tmp_path / "b", ["x"], "h", 4, dtype="float32")
    w.add(torch.ones(5, 1, 4), torch.zeros(5))
    store = w.finish()
    f = tmp_path / "b" / shard_name(0)
    save_file({"acts": acts, "tokens": torch.zeros(5, dtype=torch.long), "positions": torch.arange(5)}, str(f))
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m["shards"][0]["bytes"] = f.stat().st_size
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=f"{f.name}.*non-finite"):
        ActivationStore(tmp_path / "b").load_shard(0, check_sha=False)
    del store


def test_damage_gives_clear_errors(tmp_path):
    w, _ = _write(tmp_path)
    w.finish()
    f = tmp_path / shard_name(1)
    good = f.read_bytes()
    # altered shard, same size: checksum
    bad = bytearray(good)
    bad[-5] ^= 0xFF
    f.write_bytes(bytes(bad))
    with pytest.raises(StoreError, match=f"{f.name}.*sha256"):
        ActivationStore(tmp_path).verify()
    with pytest.raises(StoreError, match=f"{f.name}.*sha256"):
        list(ActivationStore(tmp_path).batches(8, n_epochs=1))
    # truncated shard: size at open, and a truncated safetensors body when sizes are not consulted
    f.write_bytes(good[:-100])
    with pytest.raises(StoreError, match=f"{f.name}.*truncated"):
        ActivationStore(tmp_path)
    # missing shard
    f.unlink()
    with pytest.raises(StoreError, match=f"{f.name}.*missing"):
        ActivationStore(tmp_path)
    f.write_bytes(good)
    store = ActivationStore(tmp_path)
    store.verify()
    # sources / d_in mismatch with a crosscoder
    with pytest.raises(StoreError, match="manifest.json.*n_sources=4, d_in=8"):
        store.check_matches(4, D)
    store.check_matches(S, D)


def test_manifest_disagreeing_with_shards(tmp_path):
    w, _ = _write(tmp_path)
    w.finish()
    mpath = tmp_path / "manifest.json"
    m = json.loads(mpath.read_text())
    for field, value, msg in [("n_tokens", 99, "n_tokens 99"), ("d_in", 16, "disagree"),
                              ("dtype", "bfloat16", "manifest says bfloat16")]:
        mpath.write_text(json.dumps({**m, field: value}))
        with pytest.raises(StoreError, match=msg):
            ActivationStore(tmp_path).verify()
    shards = [dict(s) for s in m["shards"]]
    shards[0]["n_tokens"] = 41
    mpath.write_text(json.dumps({**m, "shards": shards, "n_tokens": 149}))
    with pytest.raises(StoreError, match="shard-00000.*disagree"):
        ActivationStore(tmp_path).verify()
    # truncated safetensors whose manifest entry was updated to match (sizes and sha agree)
    f = tmp_path / shard_name(2)
    data = f.read_bytes()[:-64]
    f.write_bytes(data)
    import hashlib
    shards = [dict(s) for s in m["shards"]]
    shards[2].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    mpath.write_text(json.dumps({**m, "shards": shards}))
    with pytest.raises(StoreError, match="shard-00002.*not a readable safetensors"):
        ActivationStore(tmp_path).verify()
    mpath.write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json: unreadable"):
        ActivationStore(tmp_path)


def _bf16_store(tmp_path):
    _write(tmp_path, sizes=(30, 17, 41, 30, 25, 33), dtype="bfloat16")
    return StoreWriter(tmp_path, [f"step{i}" for i in range(S)], "blocks.0.hook_resid_post", D, dtype="bfloat16").finish()


def _digest(batches):
    import hashlib

    h = hashlib.sha256()
    for x in batches:
        h.update(str(list(x.shape)).encode())
        h.update(x.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def test_reader_batches_are_the_ones_it_read_before_the_row_reads(tmp_path):
    # digests of the batches of the reader that loaded whole shards into its buffer (commit d8ce1f2)
    store = _bf16_store(tmp_path)
    assert _digest(store.batches(20, seed=3, n_epochs=3, shuffle_buffer_tokens=70)) == "972836a528dbe54e"
    assert _digest(store.batches(20, seed=3, n_epochs=3, shuffle_buffer_tokens=70, start_batch=5)) == "d3d28f14c8b8b45e"
    assert _digest(store.batches(24, seed=1, normalize=False, n_epochs=2)) == "25be2d8d47dd0cb0"


@pytest.mark.parametrize("D,sources", [(2, slice(None)), (4, slice(1, 3))])
def test_a_data_rank_reads_only_its_rows_and_checks_its_share_of_shards(tmp_path, monkeypatch, D, sources):
    store = _bf16_store(tmp_path)
    full = list(store.batches(20, seed=3, n_epochs=2, shuffle_buffer_tokens=70, start_batch=2))
    read, checked = [], []
    rows_of, load = ActivationStore._read_rows, ActivationStore.load_shard
    monkeypatch.setattr(ActivationStore, "_read_rows", lambda self, idx, src=slice(None): read.append(len(idx)) or rows_of(self, idx, src))
    monkeypatch.setattr(ActivationStore, "load_shard", lambda self, i, check_sha=True: checked.append(i) or load(self, i, check_sha))
    parts = []
    for d in range(D):
        read.clear(), checked.clear()
        parts.append(list(ActivationStore(tmp_path).batches(20, seed=3, n_epochs=2, shuffle_buffer_tokens=70,
                                                           start_batch=2, rows=(d, D), sources=sources)))
        assert read == [len(x) // D for x in full]  # its rows of each batch, nothing else
        assert checked and all(i % D == d for i in checked) and len(set(checked)) == len(checked)
    for k, x in enumerate(full):
        assert torch.equal(torch.cat([p[k] for p in parts]), x[:, sources])
    with pytest.raises(StoreError, match="does not split over 3 data ranks"):
        next(store.batches(20, rows=(0, 3)))


def test_prefetcher_gives_the_same_batches_stops_cleanly_and_resumes(tmp_path, monkeypatch):
    from crosscoders.prefetch import Prefetcher

    store = _bf16_store(tmp_path)
    ref = list(store.batches(16, seed=2, n_epochs=2))
    with Prefetcher(store.batches(16, seed=2, n_epochs=2), "cpu", depth=3) as p:
        assert all(torch.equal(a, b) for a, b in zip(p, ref, strict=True))
    p = Prefetcher(store.batches(16, seed=2, n_epochs=2), "cpu", depth=2)
    head = [next(p) for _ in range(4)]
    p.close()  # mid-stream: the thread ends, the reader is closed
    assert not p._thread.is_alive() and p._source.gi_frame is None
    with Prefetcher(store.batches(16, seed=2, n_epochs=2, start_batch=4), "cpu") as q:  # a resume at batch 4
        assert all(torch.equal(a, b) for a, b in zip(head + list(q), ref, strict=True))

    def dies_at_2():
        yield from ref[:2]
        raise OSError("disk gone")
    with Prefetcher(dies_at_2(), "cpu") as p:
        assert torch.equal(next(p), ref[0]) and torch.equal(next(p), ref[1])
        with pytest.raises(OSError, match="disk gone"):
            next(p)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not Prefetcher(iter([]), "cuda").pin  # pinned buffers only where a CUDA driver is there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Prefetcher(iter([]), "cuda").pin and not Prefetcher(iter([]), "cpu").pin
