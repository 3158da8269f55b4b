"""The probes read what the harvest stored: their snapshot forwards run in the precision the store records."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crosscoders.harvest import model_acts
from evolution.features.snapshot_acts import _hook_acts, harvest_autocast

HOOK = "blocks.1.hook_resid_post"


def _model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_mlp=64, d_vocab=50,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    return HookedTransformer(cfg).eval()


def test_probe_forward_equals_the_harvest_forward_in_each_precision():
    model, tokens = _model(), torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    got = {}
    for autocast in ("none", "bf16"):
        probe = _hook_acts(model, HOOK, tokens, autocast).float()
        harvest = model_acts(model, tokens, [HOOK], batch_size=3, autocast=autocast)[HOOK]
        assert torch.equal(probe, harvest), autocast
        got[autocast] = probe
    assert not torch.equal(got["none"], got["bf16"])  # the precision is visible, so the test can fail


def test_the_store_manifest_names_the_probes_precision():
    assert harvest_autocast({"metadata": {"forward": {"precision": "bf16", "autocast": "auto"}}}) == "bf16"
    assert harvest_autocast({"metadata": {"forward": {"precision": "fp32"}}}) == "none"
    assert harvest_autocast({"metadata": {}}) == "none"  # a store harvested before the record: fp32
