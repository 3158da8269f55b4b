"""The analysis stages (evaluate, geometry, interventions) compute where their model runs: nothing heavy is
copied to the host, TF32 is allowed on CUDA inside them only, their fp32 path (CUDA's) agrees with the fp64
reference (the CPU's), and the same bodies run on "cuda" under `-m cuda` (crosscoders/compute.py)."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import evolution.evaluate.snapshots as ev
import evolution.interventions.linear_replacement as lr
import evolution.interventions.logit_lens as ll
from crosscoders.compute import model_device, stat_dtype, tf32
from evolution.geometry.stage import GeometryConfig, model_geometry
from evolution.interventions.logit_effects import logit_effects_matrix, top_effects
from evolution.sources.references import bigram_table, unigram_log_probs_table
from tests.conftest import DEVICES

V, D, BOS = 200, 32, 0
HEAVY = 1000  # numel: logits [4, 16, 200], residuals [64, 32], effects [24, 200] are all above it


def _model(seed=0, device="cpu") -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=16, d_head=8, n_heads=4, d_mlp=64, d_vocab=V,
                                  act_fn="gelu", normalization_type="LN", seed=seed)
    return HookedTransformer(cfg).eval().to(device)


def _tokens(n=8, s=16, seed=0) -> torch.Tensor:
    t = torch.randint(1, V, (n, s), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = BOS
    return t


@pytest.fixture
def host_reads(monkeypatch):
    """numel of every tensor read back to the host (`.cpu()`, `.numpy()`) from here on."""
    seen: list[int] = []
    cpu, numpy = torch.Tensor.cpu, torch.Tensor.numpy

    def counted(f):
        def g(self, *a, **k):
            seen.append(self.numel())
            return f(self, *a, **k)
        return g
    monkeypatch.setattr(torch.Tensor, "cpu", counted(cpu))
    monkeypatch.setattr(torch.Tensor, "numpy", counted(numpy))
    return seen


def test_tf32_is_allowed_inside_a_cuda_stage_only_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32
    with tf32("cpu"):
        assert torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(RuntimeError), tf32("cuda"):  # the flag is set without a GPU: no kernel runs here
        assert torch.backends.cuda.matmul.allow_tf32
        raise RuntimeError
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert stat_dtype("cpu") == torch.float64 and stat_dtype("cuda:0") == torch.float32
    assert model_device(_model()) == torch.device("cpu") and model_device(lambda t: t) == torch.device("cpu")


def test_no_heavy_tensor_goes_to_the_host(host_reads, monkeypatch):
    model, tokens, train = _model(), _tokens(), _tokens(32, seed=1)
    entered = []
    for mod in (ev, lr, ll):  # TF32 is asked for on the model's device
        monkeypatch.setattr(mod, "tf32", lambda d, f=mod.tf32: (entered.append(torch.device(d)), f(d))[1])
    host_reads.clear()
    ev.evaluate_snapshot(model, tokens, tokens[:, 1:] != BOS, unigram_log_probs_table(train, V),
                         bigram_table(train, V), batch_size=4)
    model_geometry(model, tokens, GeometryConfig(n_tokens=64, n_resamples=2, mle_k1=4, mle_k2=8))
    cfg = lr.ReplacementConfig(n_fit_tokens=64, n_score_tokens=48, n_bootstrap=20, distill_steps=2)
    lr.block_interventions(model, train, tokens, cfg, BOS)
    ll.logit_lens(model, tokens, 4, BOS)
    top_effects(logit_effects_matrix(model, torch.randn(24, D)), 5)
    assert host_reads and max(host_reads) < HEAVY, sorted(host_reads)[-5:]
    assert entered and set(entered) == {torch.device("cpu")}


def test_the_fp32_path_agrees_with_the_fp64_reference(monkeypatch):
    """On CUDA the statistics run in fp32 (stat_dtype): the same code in fp32 here is within fp32 noise."""
    model, tokens, train = _model(seed=1), _tokens(seed=2), _tokens(32, seed=3)
    tables = unigram_log_probs_table(train, V), bigram_table(train, V)
    keep = tokens[:, 1:] != BOS

    def run():
        return (ev.evaluate_snapshot(model, tokens, keep, *tables, batch_size=4), lr.batch_nll(model, tokens, 4, BOS),
                ll.logit_lens(model, tokens, 4, BOS))
    ref = run()
    for mod in (ev, lr, ll):
        monkeypatch.setattr(mod, "stat_dtype", lambda d: torch.float32)
    got = run()
    for k in ev.PER_TOKEN:
        torch.testing.assert_close(got[0][k], ref[0][k], atol=2e-5, rtol=1e-5)
    assert got[1][0] == pytest.approx(ref[1][0], rel=1e-6) and (got[1][1] == ref[1][1]).all()
    assert got[2]["loss"] == pytest.approx(ref[2]["loss"], rel=1e-6)
    assert got[2]["top1_agreement"] == ref[2]["top1_agreement"]


# ---------------------------------------------------------------- the same bodies on "cpu" and on "cuda"


@pytest.mark.parametrize("device", DEVICES)
def test_splice_on_the_device_outputs_the_least_squares_prediction(device):
    model, tokens = _model(device=device), _tokens(32).to(device)
    _, cache = model.run_with_cache(tokens)
    X, Y = cache["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_post"]
    m = lr.fit_affine(X[:, 1:].reshape(-1, D), Y[:, 1:].reshape(-1, D))
    assert m.W.device == X.device  # fitted where the residuals are (CUDA's lstsq has no gelsd: the SVD solve)
    ref = lr.fit_affine(X[:, 1:].reshape(-1, D).cpu(), Y[:, 1:].reshape(-1, D).cpu())
    torch.testing.assert_close(m.W.cpu(), ref.W, atol=1e-8, rtol=1e-8)
    with lr.spliced(model, {0: m}):
        _, cache2 = model.run_with_cache(tokens)
    torch.testing.assert_close(cache2["blocks.1.hook_resid_pre"][:, 1:], m(X[:, 1:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache2["blocks.1.hook_resid_pre"][:, 0], Y[:, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_distillation_on_the_device_matches_the_cpu(device):
    cfg = lr.ReplacementConfig(n_fit_tokens=400, n_score_tokens=200, n_bootstrap=50, prune=False, distill_steps=20,
                               distill_lr=3e-3)
    res = lr.block_interventions(_model(seed=3, device=device), _tokens(48, seed=2), _tokens(16, seed=3), cfg, BOS)
    ref = lr.block_interventions(_model(seed=3), _tokens(48, seed=2), _tokens(16, seed=3), cfg, BOS)
    assert res["base_loss"] == pytest.approx(ref["base_loss"], rel=1e-4)  # TF32 and fp32 on CUDA, fp64 here
    for b, r in zip(res["blocks"], ref["blocks"], strict=True):
        assert b["r2_heldout"] == pytest.approx(r["r2_heldout"], abs=1e-3)
        assert b["linear"]["delta"] == pytest.approx(r["linear"]["delta"], abs=1e-3)
        assert b["linear_distilled"]["delta"] == pytest.approx(r["linear_distilled"]["delta"], abs=5e-3)
        assert b["linear_distilled"]["delta"] != b["linear"]["delta"]  # the map did train


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_and_geometry_on_the_device_match_the_cpu(device):
    tokens, train = _tokens(seed=4), _tokens(32, seed=5)
    tables, keep = (unigram_log_probs_table(train, V), bigram_table(train, V)), tokens[:, 1:] != BOS
    got = ev.evaluate_snapshot(_model(seed=4, device=device), tokens, keep, *tables, batch_size=4)
    ref = ev.evaluate_snapshot(_model(seed=4), tokens, keep, *tables, batch_size=4)
    for k in ev.PER_TOKEN:
        assert got[k].device.type == "cpu"
        torch.testing.assert_close(got[k], ref[k].float(), atol=1e-3, rtol=1e-3)
    gcfg = GeometryConfig(n_tokens=100, n_resamples=0, mle_k1=4, mle_k2=8)
    g = model_geometry(_model(seed=4, device=device), tokens, gcfg)["metrics"]
    r = model_geometry(_model(seed=4), tokens, gcfg)["metrics"]
    for m in ("anisotropy", "id_twonn", "id_mle", "mean_norm"):
        assert g[m] == pytest.approx(r[m], rel=1e-3), m
