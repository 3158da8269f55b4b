"""End to end on planted features: train a small crosscoder, `analyze` the run, read it with `load_run`.

Acceptance (issue 4): the computed peak index equals the planted one for >= 90% of recovered features,
and the turning point is found where it was planted.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import evolution
from crosscoders.config import CrosscoderConfig, TrainConfig
from crosscoders.io import write_json
from crosscoders.synthetic import PlantedFeatures, SyntheticConfig, match_features
from crosscoders.train import train
from evolution.features.analyze import AnalyzeConfig, analyze, source_steps
from tests.chromium import Chromium, chromium_path, requires_chromium

STEPS = [0, 16, 64, 256, 512, 1000, 2000, 4000, 8000, 16000]
TURN_AT = 4  # planted turning point: source 4 = step 512


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    truth = PlantedFeatures(SyntheticConfig(n_sources=len(STEPS), d_in=32, n_features=64, turn_at=TURN_AT, seed=0))
    scale = truth.norm_scale()
    # nested_k_frac=0: the recipe this fixture was written for. On these planted data the angle to the final
    # direction falls as fast over the last interval (8000 -> 16000, where it reaches 0 by definition) as over
    # the planted turn (256 -> 512): about 0.31 against 0.32 rad (norm-weighted mean over latents); with the
    # nested top-k default (which recovers 1.00 of the features here against 0.95) about 0.34 against 0.30, the
    # largest rate lands on the last interval, which the analysis flags "not used". The turning-point assertion
    # tests the analysis, not the recipe.
    cfg = TrainConfig(crosscoder=CrosscoderConfig(d_sae=128, activation="batchtopk", k=4), steps=500,
                      batch_size=512, lr=3e-3, progress=False, log_every=10_000, checkpoint_every=10_000,
                      nested_k_frac=0.0)
    path = tmp_path_factory.mktemp("run")
    model = train(cfg, truth.batch_source(512, scale), path / "crosscoder", norm_scale=scale)
    write_json(path / "crosscoder" / "eval.json", {"sources": [f"step{s}" for s in STEPS]})
    summary = analyze(path, AnalyzeConfig())
    return path, truth, model, summary


def test_analyze_recovers_planted_peaks_and_turning_point(run):
    path, truth, model, summary = run
    r = evolution.load_run(path)
    cos, idx = match_features(model.W_dec.detach() * model.norm_scale[:, None, None], truth)
    hit = cos >= 0.9
    assert hit.float().mean() >= 0.8
    peak = torch.tensor(r.features["peak_index"].to_numpy())[idx]
    frac = (peak == truth.peak_index)[hit].float().mean().item()
    print(f"recovered {hit.float().mean():.3f}, peak index correct {frac:.3f}, turning point "
          f"{summary['turning_point_step']} (planted {STEPS[TURN_AT]}), agreement {summary['turn_agreement']:.2f}")
    assert frac >= 0.9
    assert summary["turning_point"]["index"] == TURN_AT and summary["turning_point"]["used"]
    assert summary["turning_point_step"] == summary["turning_point"]["step"] == r.turning_point_step
    # mean cosine to the final direction jumps at the planted turn
    m = torch.tensor(summary["mean_cos_to_final"])
    assert int((m[1:] - m[:-1]).argmax()) + 1 == TURN_AT


def test_analysis_files_follow_the_schema(run):
    path, *_ = run
    a = path / "analysis"
    df = pd.read_csv(a / "features.csv")
    for col in ("feature", "peak_index", "peak_step", "emergence_step", "fade_step", "max_norm", "group"):
        assert col in df
    assert len(df) == 128 and set(df["peak_step"]) <= set(STEPS)
    s = json.loads((a / "summary.json").read_text())
    assert s["steps"] == STEPS and s["probes"] is False
    for name in ("heatmap.png", "peak_steps.png", "timelines_by_group.png", "cos_to_final.png"):
        assert (a / "figures" / name).stat().st_size > 5000
    assert (a / "browser" / "index.html").exists()


def test_load_run_api(run):
    path, _, model, _ = run
    r = evolution.load_run(path)
    assert r.steps == STEPS and r.analyzed
    assert isinstance(r.features, pd.DataFrame) and len(r.features) == 128
    assert r.features["fade_step"].dtype == "Int64"
    torch.testing.assert_close(r.timelines.norms, model.decoder_norms().detach(), rtol=1e-4, atol=1e-5)
    for fig in (r.plot_heatmap(), r.plot_peak_steps(), r.plot_timelines_by_group(), r.plot_cos_to_final()):
        assert isinstance(fig, Figure)
    assert r.plot_timelines_by_type() is None  # no type scores without probes
    f = r.feature(3)
    assert f["feature"] == 3 and list(f["rel_norms"]) == STEPS and f["contexts"] == {}
    pc = r.pairwise_cos([3])
    torch.testing.assert_close(pc[0, :, -1], r.timelines.cos_to_final[3], rtol=1e-4, atol=1e-5)
    # without analysis/: computed in memory from the crosscoder, same numbers
    bare = path.parent / "bare"
    (bare / "crosscoder").mkdir(parents=True)
    for p in (path / "crosscoder").iterdir():
        if p.is_file():
            (bare / "crosscoder" / p.name).write_bytes(p.read_bytes())
    r2 = evolution.load_run(bare)
    assert not r2.analyzed and r2.turning_point_step == r.turning_point_step
    torch.testing.assert_close(r2.timelines.rel_norms, r.timelines.rel_norms)
    with pytest.raises(FileNotFoundError, match="analyze"):
        evolution.load_run(path.parent)


def test_source_steps(tmp_path):
    (tmp_path / "activations" / "blocks.1.hook_resid_post").mkdir(parents=True)
    write_json(tmp_path / "activations" / "blocks.1.hook_resid_post" / "manifest.json",
               {"sources": ["step0", "step2", "step1000"], "hook": "blocks.1.hook_resid_post"})
    assert source_steps(tmp_path, 3) == [0, 2, 1000]
    with pytest.raises(ValueError, match="cannot tell the training steps of the 4"):
        source_steps(tmp_path, 4)
    for s in (0, 8, 64, 512):
        (tmp_path / "snapshots" / f"step{s}").mkdir(parents=True)
        (tmp_path / "snapshots" / f"step{s}" / "config.json").write_text("{}")
    assert source_steps(tmp_path, 4) == [0, 8, 64, 512]


@requires_chromium
def test_analyzed_browser_renders(run):
    path, *_ = run
    with Chromium() as br:
        page = br.open(path / "analysis" / "browser" / "index.html", "#feature-0")
        assert page.errors == []
        assert page.evaluate("document.querySelectorAll('#features tbody tr').length") == 128
        assert page.evaluate("document.querySelector('#detail h2').textContent") == "Feature 0"


def test_analyze_with_probes_on_a_tiny_pretrained_run(tmp_path):
    """The whole path with the probes: planted corpus, a tiny model with 3 snapshots, a crosscoder on
    its residual stream; `analyze` merges type scores and writes contexts the browser shows."""
    from evolution.sources.corpus import CorpusConfig, build_corpus
    from evolution.sources.pretrain import ModelConfig, PretrainConfig, pretrain
    from evolution.sources.snapshots import iter_snapshots

    corpus = build_corpus(CorpusConfig(seq_len=32, n_train_seqs=128, n_eval_seqs=16, vocab_size=256))
    corpus.save(tmp_path)
    steps = pretrain(PretrainConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64, n_ctx=32),
                                    steps=20, batch_size=8, snapshot_steps=[0, 5, 20], eval_every=20,
                                    checkpoint_every=1000), corpus, tmp_path)
    hook = "blocks.1.hook_resid_post"
    acts = []
    for _, m in iter_snapshots(tmp_path / "snapshots", steps):
        _, cache = m.run_with_cache(corpus.tokens[:32], names_filter=hook)
        acts.append(cache[hook][:, 1:].reshape(-1, 32))
    x = torch.stack(acts, 1)
    scale = 32**0.5 / x.norm(dim=-1).mean(0)

    def source(start=0):
        g = torch.Generator().manual_seed(start)
        while True:
            yield x[torch.randint(len(x), (128,), generator=g)] * scale[:, None]

    train(TrainConfig(crosscoder=CrosscoderConfig(d_sae=32, k=4), steps=30, batch_size=128, progress=False),
          source, tmp_path / "crosscoder", norm_scale=scale)
    write_json(tmp_path / "activations" / hook / "manifest.json", {"sources": [f"step{s}" for s in steps], "hook": hook})
    summary = analyze(tmp_path, AnalyzeConfig(probe_max_seqs=16))
    assert summary["probes"] and summary["steps"] == steps == [0, 5, 20]
    r = evolution.load_run(tmp_path)
    for col in ("r2_current", "r2_previous", "induction_contrast", "type", "type_score_induction", "gt_type", "group",
                "peak_step"):
        assert col in r.features
    # one family of type scores: the signed probe statistics are not published under a score's name
    assert not [c for c in r.features if c.endswith("_score") and not c.startswith("type_score_")]
    assert set(summary["peak_step_by_type"]) <= {*corpus.mechanism_names, "none"}
    assert (tmp_path / "analysis" / "figures" / "timelines_by_type.png").exists()
    f = next(i for i in range(32) if r.contexts.get(str(i)))
    ctx = r.feature(f)["contexts"]
    assert set(ctx) <= {str(s) for s in steps}
    if chromium_path() is not None:
        with Chromium() as br:
            page = br.open(tmp_path / "analysis" / "browser" / "index.html", f"#feature-{f}")
            assert page.errors == []
            # shared gate (BatchTopK): one list of contexts, the last probed snapshot's, since every snapshot
            # ranks the same contexts
            last = max(ctx, key=int)
            assert page.evaluate("document.querySelectorAll('#detail mark').length") == len(ctx[last])


def test_peak_step_by_clear_type_drops_features_that_fire_everywhere():
    import pandas as pd

    from evolution.features.analyze import peak_step_by_type

    f = pd.DataFrame({"dead": [False] * 4, "gt_type": ["copy", "copy", "bigram", "bigram"],
                      "gt_lift": [3.0, 1.0, 2.0, 1.1], "peak_step": [2000, 10, 100, 5]})
    assert peak_step_by_type(f)["copy"]["median"] == 1005
    clear = peak_step_by_type(f, min_lift=1.5)
    assert clear == {"copy": {"median": 2000.0, "mean": 2000.0, "n": 1}, "bigram": {"median": 100.0, "mean": 100.0, "n": 1}}
