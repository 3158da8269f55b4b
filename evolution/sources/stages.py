"""The stages that make the run's inputs: the corpus, and (with `snapshots.source = "pretrain"`) the run's own
mini-Pythia snapshots with its loss figure and the step each planted mechanism was learned at."""

from __future__ import annotations

import json

from crosscoders.io import read_jsonl, write_json
from evolution.context import RunContext
from evolution.sources.corpus import build_corpus
from evolution.sources.learning import learned_steps, learning_onsets, save_loss_figure
from evolution.sources.pretrain import pretrain


def corpus_stage(ctx: RunContext) -> None:
    """The corpus; for local: and hf: snapshots tokenized with the snapshots' own tokenizer (unless [corpus]
    tokenizer names one) and checked against them before it is saved."""
    cfg = ctx.cfg
    if cfg.snapshots.source == "pretrain":
        build_corpus(cfg.corpus).save(ctx.run_dir)
        return
    src = ctx.source
    own = cfg.corpus.tokenizer is None and cfg.corpus.source != "planted"
    corpus = build_corpus(cfg.corpus, src.tokenizer() if own else None,
                          f"{src.source} ({src.location(src.steps[-1])})" if own else None)
    src.check_corpus(corpus)
    corpus.save(ctx.run_dir)


def pretrain_stage(ctx: RunContext) -> None:
    """The run's mini-Pythia: `snapshots/step*/`, `pretrain/log.jsonl`, `figures/loss.png`, and on the planted
    corpus `pretrain/learned_steps.json` and `learning_onsets.json`."""
    run = ctx.run_dir
    pretrain(ctx.cfg.pretrain, ctx.corpus, run)
    save_loss_figure(run)
    meta = json.loads((run / "corpus" / "meta.json").read_text())
    if refs := meta.get("mechanism_references"):
        log = read_jsonl(run / "pretrain" / "log.jsonl")
        write_json(run / "pretrain" / "learned_steps.json", learned_steps(log, refs))
        write_json(run / "pretrain" / "learning_onsets.json", learning_onsets(log))
