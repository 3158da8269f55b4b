"""Acceptance over a family of generators (issue 23): every scheme x gate, with its defaults and no per-draw
tuning, recovers >= 0.95 of planted features with exact peak >= 0.90 on every draw of
`crosscoders.synthetic.family_config` (training and judging: benchmarks/recovery_sweep.py, whose docstring
states what is set from a draw). The slow test sweeps draws 0-11 and prints each draw's settings
(`pytest -m slow -s tests/crosscoders/test_recovery_family.py`); two cheap draws of those stay in the fast suite.

Schemes measured below the bar are marked xfail(strict=True) with the measured numbers, not hidden: the defaults
are not tuned to this generator, nor the bar lowered (issue 23).
"""

import pytest
import torch

from benchmarks.recovery_sweep import BARS, SCHEMES, describe, run_draw, run_scheme
from crosscoders.synthetic import PlantedFeatures, family_config

SLOW_DRAWS = list(range(12))
FAST_DRAWS = [1, 3]  # two of the 12 with 2 sources (a bump and a rise draw): 7-26 s per scheme
# Measured below the bar (benchmarks/recovery_sweep.py, draws 0-11, one thread; recovered / exact peak).
OPEN: dict[str, str] = {
    "relu:shared": "draw 0 (30 sources, co_active 0.40): recovered 0.92; every other draw 1.00 / 1.00",
    "batchtopk:shared": "recovered min 0.50 (draw 6), 0.62 (draw 3), 0.65 (draw 2), 0.85 (draw 0), 0.93 (draw 4); 7 of 12 pass; "
                        "exact peak >= 0.91",
    "jumprelu:shared": "recovered min 0.14 (draw 2), 0.44 (draw 1), 0.60 (draw 3); 2 of 12 draws pass",
    "jumprelu:per_source": "recovered min 0.41 (draw 1), 0.46 (draw 2), 0.71 (draw 7); exact peak 0.87 (draw 8); 4 of 12 pass",
}
OPEN_FAST: dict[tuple[int, str], str] = {
    (1, "jumprelu:shared"): "recovered 0.44 (L0 6.31 against 3.33 planted, FVU 0.008)",
    (1, "jumprelu:per_source"): "recovered 0.41 (L0 6.46 against 3.33 planted, FVU 0.008)",
    (3, "batchtopk:shared"): "recovered 0.62 (k = 1.5 x planted L0 4.20, 74% of latents dead)",
    (3, "jumprelu:shared"): "recovered 0.60 (L0 4.05 against 4.20 planted)",
}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def marked(*args, reason: str | None = None, id: str | None = None):
    return pytest.param(*args, marks=pytest.mark.xfail(reason=reason, strict=True) if reason else (), id=id)


@pytest.mark.parametrize("seed,scheme", [marked(seed, s, reason=OPEN_FAST.get((seed, s)), id=f"draw{seed}-{s}")
                                         for seed in FAST_DRAWS for s in SCHEMES])
def test_family_recovery_fast(tmp_path, seed, scheme):
    truth = PlantedFeatures(family_config(seed))
    r = run_scheme(truth, scheme, tmp_path)
    print(f"\ndraw {seed} {scheme}: recovered {r['frac_recovered']:.2f}, exact peak {r['frac_peak_correct']:.2f}, "
          f"L0 {r['l0']:.2f} / planted {r['planted_l0']:.2f}")
    assert r["frac_recovered"] >= BARS["frac_recovered"]
    assert r["frac_peak_correct"] >= BARS["frac_peak_correct"]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [marked(s, reason=OPEN.get(s), id=s) for s in SCHEMES])
def test_family_recovery_every_draw(scheme):
    rs = []
    for seed in SLOW_DRAWS:
        draw = run_draw(seed, [scheme], verbose=False)
        r = draw["results"][scheme]
        print(f"\ndraw {seed}: {describe(draw)}\n  {scheme}: recovered {r['frac_recovered']:.2f}, exact peak "
              f"{r['frac_peak_correct']:.2f}, L0 {r['l0']:.2f} / planted {r['planted_l0']:.2f}")
        rs.append(r)
    assert min(r["frac_recovered"] for r in rs) >= BARS["frac_recovered"]
    assert min(r["frac_peak_correct"] for r in rs) >= BARS["frac_peak_correct"]
