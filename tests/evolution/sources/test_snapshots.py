"""Snapshot schedules and loaders: HF ↔ transformer-lens parity, a hub-shaped local cache, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from evolution.sources.pretrain import ModelConfig, build_model, save_snapshot
from evolution.sources.snapshots import (
    GE2025_STEPS,
    PYTHIA_STEPS,
    SnapshotError,
    iter_snapshots,
    load_local_snapshot,
    load_pythia_snapshot,
    local_steps,
    pythia_like_schedule,
)
from evolution.sources.standin import write_hub_cache
from evolution.sources.tokenizer import word_level_tokenizer

VOCAB = 40


def _tokenizer():
    return word_level_tokenizer([f"w{i}" for i in range(VOCAB - 1)])


def _model(seed=0, d_model=32, n_layers=2):
    torch.manual_seed(seed)
    m = build_model(ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=4, d_mlp=64, n_ctx=16).resolved(16), VOCAB, 0)
    # random LayerNorm gains/biases and biases too, so the conversion of every parameter is exercised
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return m.eval()


@pytest.fixture
def snap_root(tmp_path):
    tok = _tokenizer()
    for step, seed in [(0, 0), (4, 1), (16, 2)]:
        save_snapshot(_model(seed), tok, tmp_path / "snapshots", step)
    return tmp_path / "snapshots"


def test_pythia_constants():
    assert len(PYTHIA_STEPS) == 154 and PYTHIA_STEPS[:11] == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert PYTHIA_STEPS[11:13] == (1000, 2000) and PYTHIA_STEPS[-1] == 143000
    assert len(GE2025_STEPS) == 32 and GE2025_STEPS[0] == 0 and 1 not in GE2025_STEPS
    assert GE2025_STEPS[-3:] == (114000, 127000, 143000) and list(GE2025_STEPS) == sorted(GE2025_STEPS)


@pytest.mark.parametrize("max_step,n_linear", [(143000, 143), (1500, 12), (100, 10), (7, 12), (1, 3)])
def test_pythia_like_schedule(max_step, n_linear):
    s = pythia_like_schedule(max_step, n_linear)
    assert s[0] == 0 and s[-1] == max_step and s == sorted(set(s))
    linear_start = round(max_step / n_linear) or 1
    head = [x for x in s if x < linear_start]
    assert head == [0] + [2**i for i in range(len(head) - 1)]  # log-spaced head
    tail = [x for x in s if x >= linear_start]
    gaps = {b - a for a, b in zip(tail, tail[1:], strict=False)}
    assert max(gaps, default=0) - min(gaps, default=0) <= 1  # evenly spaced tail (up to rounding)
    if max_step == 143000:
        assert tuple(s) == PYTHIA_STEPS  # Pythia's own schedule is the special case
    if max_step == 1500:
        assert len(s) >= 16


def test_local_snapshot_matches_hf_logprobs(snap_root):
    from transformers import GPTNeoXForCausalLM

    assert local_steps(snap_root) == [0, 4, 16]
    path = snap_root / "step4"
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    hf = GPTNeoXForCausalLM.from_pretrained(path).eval()
    x = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0
    with torch.no_grad():
        ref = hf(x).logits.log_softmax(-1)
        for process in (False, True):
            tl = load_local_snapshot(path, process_weights=process)
            got = tl(x).log_softmax(-1)
            assert (got - ref).abs().max() <= 1e-4
        # unprocessed: the residual stream is HF's hidden state, layer by layer
        tl = load_local_snapshot(path)
        _, cache = tl.run_with_cache(x)
        hs = hf(x, output_hidden_states=True).hidden_states
    assert torch.allclose(cache["blocks.0.hook_resid_post"], hs[1], atol=1e-5)
    assert tl.cfg.rotary_dim == 2 and tl.cfg.parallel_attn_mlp  # 25% of d_head=8
    assert tl.tokenizer.decode([1, 2]) == "w0 w1"


def test_iter_snapshots_one_at_a_time_and_errors(snap_root):
    seen = [(s, m.cfg.d_model) for s, m in iter_snapshots(snap_root, steps=[16, 0])]
    assert seen == [(0, 32), (16, 32)]
    with pytest.raises(SnapshotError, match=r"\[8\] not found.*available: \[0, 4, 16\]"):
        next(iter_snapshots(snap_root, steps=[0, 8]))
    with pytest.raises(SnapshotError, match=r"step8 does not exist.*\[0, 4, 16\]"):
        load_local_snapshot(snap_root / "step8")
    with pytest.raises(SnapshotError, match="no step"):
        next(iter_snapshots(snap_root / "nothing"))


def test_non_neox_directory_is_refused(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(SnapshotError, match="not a checkpoint of a supported family"):
        load_local_snapshot(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapshotError, match="no config.json"):
        load_local_snapshot(tmp_path / "empty")



def test_pythia_loader_on_hub_shaped_cache(snap_root, tmp_path):
    """The real hub path (transformer-lens checkpoint_value -> revision step{N}), served from a local
    cache laid out like the hub's, with local_files_only so nothing reaches the network."""
    from transformers import GPTNeoXForCausalLM

    cache = tmp_path / "hub"
    write_hub_cache(cache, "EleutherAI/pythia-14m", {"main": snap_root / "step16", "step4": snap_root / "step4"})
    m = load_pythia_snapshot("EleutherAI/pythia-14m", 4, cache_dir=str(cache), local_files_only=True)
    x = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref4 = GPTNeoXForCausalLM.from_pretrained(snap_root / "step4")(x).logits.log_softmax(-1)
        ref16 = GPTNeoXForCausalLM.from_pretrained(snap_root / "step16")(x).logits.log_softmax(-1)
        got = m(x).log_softmax(-1)
    assert (got - ref4).abs().max() <= 1e-4  # revision step4, not main
    assert (got - ref16).abs().max() > 1e-2
    assert m.cfg.checkpoint_value == 4
    with pytest.raises(SnapshotError, match="no checkpoint step3"):
        load_pythia_snapshot("EleutherAI/pythia-14m", 3, cache_dir=str(cache), local_files_only=True)
    steps = [s for s, _ in iter_snapshots("hf:EleutherAI/pythia-14m", steps=[4], cache_dir=str(cache), local_files_only=True)]
    assert steps == [4]
