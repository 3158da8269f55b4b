"""Reading the harvest stage's store for training: the ranks share the check of its shards."""

import pytest
import torch

from crosscoders.mesh import Mesh
from crosscoders.store import ActivationStore, StoreError
from crosscoders.store_writer import StoreWriter
from crosscoders.train import TrainConfig
from evolution.harvest.read import Activations


def _store(path) -> ActivationStore:
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(path, ["a", "b"], "blocks.0.hook_resid_post", 4, dtype="float32")
    for i in range(7):
        w.add(torch.randn(5, 2, 4, generator=g), torch.zeros(5, dtype=torch.long), torch.arange(5 * i, 5 * i + 5))
    return w.finish()


def _rank(r: int, world: int) -> Mesh:
    return Mesh(r, world, world, 1, r, 0)


def test_each_rank_verifies_its_share_of_the_shards(tmp_path, monkeypatch):
    """Three ranks, called in turn as each would (the all-reduce of the verdict stubbed): every shard is read
    by exactly one rank, where rank 0 alone used to read the whole store."""
    store = _store(tmp_path)
    read: dict[int, list[int]] = {}
    load = ActivationStore.load_shard
    monkeypatch.setattr(Mesh, "reduce_", lambda self, t, group, op=None: t)
    for r in range(3):
        monkeypatch.setattr(ActivationStore, "load_shard", lambda self, i, *a, r=r, **k: (
            read.setdefault(r, []).append(i), load(self, i, *a, **k))[1])
        Activations(None, store.manifest, store).training_batches(TrainConfig(steps=1, batch_size=6), _rank(r, 3))
    assert read == {0: [0, 3, 6], 1: [1, 4], 2: [2, 5]}


def test_a_damaged_shard_stops_every_rank(tmp_path, monkeypatch):
    store = _store(tmp_path)
    f = tmp_path / store.manifest["shards"][4]["file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, another sha256
    f.write_bytes(bytes(data))
    acts = Activations(None, store.manifest, store)
    cfg = TrainConfig(steps=1, batch_size=6)
    monkeypatch.setattr(Mesh, "reduce_", lambda self, t, group, op=None: t + 1)  # the other rank's verdict
    with pytest.raises(StoreError, match="shard-00004.*sha256"):
        acts.training_batches(cfg, _rank(1, 3))  # shard 4 is rank 1's
    with pytest.raises(StoreError, match="another rank found a damaged shard"):
        acts.training_batches(cfg, _rank(0, 3))
