"""The nonlinearity regulariser: the cosine term against HF's own hidden states, and pre-training with it
lowers the consecutive-layer cosine (and is logged) while the plain run's log and key are unchanged."""

from __future__ import annotations

import pytest
import torch

from crosscoders.io import read_jsonl
from evolution.sources.corpus import CorpusConfig, PlantedConfig, build_corpus
from evolution.sources.pretrain import ModelConfig, PretrainConfig, build_model, keyed_config, pretrain
from evolution.sources.regularizer import consecutive_cosine, regularised_loss


@pytest.fixture(scope="module")
def corpus():
    planted = PlantedConfig(n_topics=2, topic_size=8)
    return build_corpus(CorpusConfig(seq_len=16, n_train_seqs=64, n_eval_seqs=8, vocab_size=64, seed=0, planted=planted))


def test_cosine_matches_hidden_states():
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=3, n_heads=2, d_mlp=64).resolved(16), 64, 0).eval()
    tokens = torch.randint(1, 64, (4, 16))
    tokens[:, 0] = 0
    with torch.no_grad():
        logits, cos = consecutive_cosine(model, tokens)
    with torch.no_grad():
        out = model(input_ids=tokens, output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits)
    hs = out.hidden_states  # embeddings, then each layer's output; GPT-NeoX's last entry is after the final norm
    ref = [torch.nn.functional.cosine_similarity(hs[blk][:, 1:], hs[blk + 1][:, 1:], dim=-1).mean() for blk in range(2)]
    # the last pair from a second hook-free computation: block 2's output = resid_pre + attn + mlp
    h2 = hs[2]
    with torch.no_grad():
        last = model.gpt_neox.layers[2](h2, position_embeddings=model.gpt_neox.rotary_emb(h2, torch.arange(16)[None]))
    last = last[0] if isinstance(last, tuple) else last
    ref.append(torch.nn.functional.cosine_similarity(h2[:, 1:], last[:, 1:], dim=-1).mean())
    assert float(cos) == pytest.approx(float(torch.stack(ref).mean()), abs=1e-5)
    with torch.no_grad():
        total, ce, c = regularised_loss(model, tokens, 0, 0.5)
    assert float(total) == pytest.approx(float(ce) + 0.5 * float(c), abs=1e-6)


def test_pretraining_with_the_regulariser_lowers_the_cosine(corpus, tmp_path):
    base = dict(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64), steps=40, batch_size=8, lr=3e-3,
                snapshot_steps=[0, 40], eval_every=20, seed=1)
    plain, reg = PretrainConfig(**base), PretrainConfig(**base, nonlinearity_reg=2.0)
    assert "nonlinearity_reg" not in keyed_config(plain) and keyed_config(reg)["nonlinearity_reg"] == 2.0
    pretrain(plain, corpus, tmp_path / "a")
    pretrain(reg, corpus, tmp_path / "b")
    rows_b = [r for r in read_jsonl(tmp_path / "b" / "pretrain" / "log.jsonl") if "train_loss" in r]
    assert all("reg_cos" in r for r in rows_b)
    assert not any("reg_cos" in r for r in read_jsonl(tmp_path / "a" / "pretrain" / "log.jsonl"))
    from transformers import GPTNeoXForCausalLM

    toks = corpus.eval_tokens[:8]
    cos = {}
    for name in ("a", "b"):
        m = GPTNeoXForCausalLM.from_pretrained(str(tmp_path / name / "snapshots" / "step40")).eval()
        with torch.no_grad():
            cos[name] = float(consecutive_cosine(m, toks)[1])
    assert cos["b"] < cos["a"] - 0.05, cos
