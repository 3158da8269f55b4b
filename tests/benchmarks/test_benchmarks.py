"""Smoke run of the benchmarks: tiny shapes, valid JSON with every figure the issue asks for."""

import json
import math

import torch

from benchmarks.peer_bench import PeerCrosscoder
from benchmarks.run import main
from benchmarks.train_bench import Shape


def test_flop_count():
    # encoder + decoder matmuls, forward + backward: 3 x 2 x 2 x B x S x D x H
    assert Shape(4096, 8, 256, 16384).flops_per_step() == 12 * 4096 * 8 * 256 * 16384


def test_peer_loss_is_the_published_crosscoder_loss():
    # Lindsey et al. 2024: sum over sources of the squared error + l1 * sum_i f_i sum_s |W_dec[i, s]|
    m = PeerCrosscoder(2, 4, 6)
    x = torch.randn(5, 2, 4)
    f = torch.relu(torch.einsum("bsd,sdh->bh", x, m.W_enc) + m.b_enc)
    x_hat = torch.einsum("bh,hsd->bsd", f, m.W_dec) + m.b_dec
    ref = ((x - x_hat) ** 2).sum((1, 2)).mean() + 0.3 * (f * m.W_dec.norm(dim=-1).sum(-1)).sum(-1).mean()
    torch.testing.assert_close(m.loss(x, 0.3), ref)


def test_crossover_mode(tmp_path):
    result = main(["--quick", "--only", "crossover", "--name", "x", "--results-dir", str(tmp_path)])
    rows = result["crossover"][0]["rows"]
    assert [r["k"] for r in rows] == [4, 64] and all(r["speedup"] > 0 for r in rows)


def test_jumprelu_mode(tmp_path):
    result = main(["--quick", "--only", "jumprelu", "--name", "x", "--results-dir", str(tmp_path)])
    assert [c["gate"] for c in result["jumprelu_crossover"]] == ["shared", "per_source"]
    for case in result["jumprelu_crossover"]:
        assert all(r["speedup"] > 0 and 0 < r["density"] <= 1 for r in case["rows"])
    (step,) = result["jumprelu_steps"]
    assert step["jumprelu_over_batchtopk"] > 0 and step["jumprelu_l0"] > 0


def test_quick_run_writes_valid_json(tmp_path, capsys):
    result = main(["--quick", "--name", "smoke", "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("\n{\n") + 1:])  # the full result follows the per-case lines
    assert printed["train"] == saved["train"]
    assert saved["machine"]["device"] in ("cpu", "cuda") and result["path"].endswith("smoke.json")
    peaks = saved["train"]["matmul_peak_at_start"]
    assert set(peaks) == {"fp32", "bf16"} and all(p["gflops"] > 0 for p in peaks.values())
    cases = saved["train"]["cases"]
    assert len(cases) == 4 and {c["dtype"] for c in cases} == {"fp32", "bf16"}
    for c in cases:
        for k in ("tokens_per_s", "gflops", "fraction_of_matmul_peak", "seconds_per_step"):
            assert math.isfinite(c[k]) and c[k] > 0, (k, c)
        assert c["memory"]["peak_mib"] > 0
        assert math.isclose(c["fraction_of_matmul_peak"], c["gflops"] / c["matmul_peak_gflops"])
        assert math.isclose(c["gflops"], Shape(**c["shape"]).flops_per_step() / c["seconds_per_step"] / 1e9)
    peer = saved["peer"]["cases"]
    assert [c["sparse_kernels"] for c in peer] == [False, True]  # k=32 of d_sae 64 dense, of 4096 sparse
    for c in peer:  # every line: our tokens/s, the peer's, the ratio, fractions of the measured peak
        assert math.isclose(c["ratio"], c["ours"]["tokens_per_s"] / c["peer"]["tokens_per_s"])
        for side in ("ours", "peer"):
            assert c[side]["tokens_per_s"] > 0 and 0 < c[side]["fraction_of_matmul_peak"]
            assert math.isclose(c[side]["fraction_of_matmul_peak"], c[side]["gflops"] / c["matmul_peak_gflops"])
    assert saved["machine"]["threads"] >= 1 and "cpu_flags" in saved["machine"]
    h = saved["harvest"]
    for k in ("bare_forward", "capture_hooks", "capture_cache", "harvest_chunk", "harvest_snapshot"):
        assert h[k]["seconds"] > 0 and h[k]["ratio_to_bare"] > 0, k
    assert h["bare_forward"]["ratio_to_bare"] == 1.0 and h["store_read"]["rows_per_s"] > 0
