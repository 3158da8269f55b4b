"""The probes' memory guard: per-snapshot activations hold n_tokens x d_sae floats, checked before any model runs."""

import pytest
import torch

from crosscoders.config import CrosscoderConfig
from crosscoders.errors import UserError
from crosscoders.model import Crosscoder
from evolution.features.snapshot_acts import check_memory, shared_pre_acts


def never_run():
    raise AssertionError("a snapshot model ran although the budget was exceeded")
    yield


def test_shared_pre_acts_refuses_above_the_budget_before_running_a_model():
    cc = Crosscoder(CrosscoderConfig(n_sources=2, d_in=4, d_sae=1000))
    tokens = torch.zeros(10, 100, dtype=torch.long)  # 1000 tokens x 1000 latents x 4 B = 4 MB (+ one set's acts)
    with pytest.raises(UserError, match=r"1,000 tokens x d_sae 1,000 .* probe fewer tokens"):
        shared_pre_acts(cc, never_run(), [tokens], "blocks.0.hook_resid_post", max_bytes=2**20)
    assert check_memory([tokens], 1000, max_bytes=2**24) == 2 * 4 * 1000 * 1000  # pre-acts + the set handed out


def test_the_budget_holds_pythia_160m_probes():
    """Ge et al.'s width under the default 8 GiB: 24,576 latents on 256 x 256 probe tokens and 64 induction rows
    of 65 (the type probe takes its latents in column blocks, so one block is handed out, not all)."""
    from evolution.features.snapshot_acts import HANDOUT_ELEMENTS, MAX_PRE_ACT_BYTES

    sets = [torch.zeros(256, 256, dtype=torch.long), torch.zeros(64, 65, dtype=torch.long)]
    need = check_memory(sets, 24_576)
    assert need == 4 * (24_576 * (65_536 + 4_160) + HANDOUT_ELEMENTS) and need < MAX_PRE_ACT_BYTES
    print(f"Pythia-160M probes: {need / 2**30:.2f} GiB of {MAX_PRE_ACT_BYTES / 2**30:.0f}")
