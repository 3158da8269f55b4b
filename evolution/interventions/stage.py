"""The interventions stage: per snapshot, linear replacement / removal of every block (Δloss with CIs,
greedy pruning), the logit lens, and the logit effects of the crosscoder's features.

`interventions(run_dir, steps, loaders, cfg)` streams the snapshots (`loaders[i]()` builds step
`steps[i]`'s model, one in memory at a time: the same loaders as harvest, so pretrain, `local:` and `hf:`
sources all work), writes `interventions.json` after every snapshot (an interrupted stage resumes at the
next snapshot when the config is unchanged) and, at the end, its figures and
`analysis/logit_effects.json`. Definitions: `linear_replacement`, `logit_lens`, `logit_effects`. Each runs on
the device the snapshot loader put the model on (`[harvest] device`), TF32 matmuls allowed there on CUDA.

interventions.json:
    {steps, config, config_hash, complete, tolerance,
     snapshots: {step: {base_loss, blocks: [{block, r2_fit, r2_heldout, linearity, linearity_no_residual,
                                             linear: {delta, ci, loss}, identity: {...}}],
                        prune: {order, linear: [{k, blocks, delta, ci, loss}], identity: [...]},
                        logit_lens: {layers, loss, top1_agreement}}},
     replaceable_until: {mode: [per block: step or null]}}
analysis/logit_effects.json:
    {steps, k, hook, vocab: {id: token string}, features: {i: {step: {promoted: [[id, v]], suppressed: [...]}}}}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from crosscoders.compute import model_device, release_memory, tf32
from crosscoders.dataclass_cli import config_hash, to_dict
from crosscoders.io import write_json
from crosscoders.progress import progress_bar
from evolution.interventions.linear_replacement import MODES, ReplacementConfig, block_interventions
from evolution.interventions.logit_effects import top_logit_effects
from evolution.interventions.logit_lens import logit_lens

VERSION = 1  # bump when what is recorded per snapshot changes (resume must not mix versions)


@dataclass
class InterventionsConfig(ReplacementConfig):
    """[interventions]: linear replacement, pruning, logit lens and feature logit effects per snapshot (the
    fields of `ReplacementConfig`, which fit and score the per-block maps, plus these)."""

    enabled: bool = False
    """Run the stage in the study (off by default; `feature-evolution interventions RUN` runs it anyway)."""
    n_eval_seqs: int = 128
    """Held-out corpus rows for Δloss and the logit lens (`eval_batch_size` rows per bootstrap unit)."""
    tolerance: float = 0.05
    """Δloss (nats/token) within which a block counts as replaceable: `replaceable_until` is the first
    step from which on the CI's lower end stays above it."""
    logit_lens: bool = True
    """Record the logit lens (loss and top-1 agreement per layer) of every snapshot."""
    logit_effects: bool = True
    """Write analysis/logit_effects.json (top promoted / suppressed tokens per feature and snapshot)
    when the run has a crosscoder over these snapshots."""
    top_k: int = 5
    """Tokens per feature and snapshot in logit_effects.json (promoted and suppressed each)."""
    resume: bool = True
    """Keep snapshots already in interventions.json under the same config."""
    steps: list[int] | None = None
    """Snapshot steps the stage runs on (default: all of the run's; each costs about 3 forwards per block over
    the eval rows, and the logit effects a d_sae x d_model x d_vocab product). `Run.logit_effects` computes a
    step left out on demand."""


def _hash(cfg: InterventionsConfig) -> str:
    d = {k: v for k, v in to_dict(cfg).items() if k not in ("enabled", "resume", "logit_effects", "top_k", "tolerance", "steps")}
    return config_hash({**d, "version": VERSION})


def _fit_rows(tokens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Enough leading rows for `n_tokens` non-BOS positions, twice over (the sample spreads over them)."""
    rows = -(-2 * n_tokens // max(tokens.shape[1] - 1, 1))
    return tokens[: max(rows, 1)]


def replaceable_until(snapshots: dict[int, dict], tolerance: float, mode: str) -> list[int | None]:
    """Per block, the first step from which on (it and every later snapshot) Δloss's CI lies above
    `tolerance`: the block is no longer replaceable within the tolerance. None: never (at the last snapshot
    it is still replaceable)."""
    steps = sorted(snapshots)
    n_blocks = len(snapshots[steps[0]]["blocks"])
    out: list[int | None] = []
    for blk in range(n_blocks):
        first = None
        for s in reversed(steps):
            if snapshots[s]["blocks"][blk][mode]["ci"][0] > tolerance:
                first = s
            else:
                break
        out.append(first)
    return out


def interventions(run_dir: str | Path, steps: Sequence[int], loaders: Sequence[Callable[[], torch.nn.Module]],
                  cfg: InterventionsConfig | None = None) -> dict:
    """Run every snapshot through the interventions (module docstring); returns interventions.json."""
    from evolution.sources.corpus import Corpus

    cfg = cfg or InterventionsConfig()
    run = Path(run_dir)
    corpus = Corpus.load(run / "corpus")
    eval_src = corpus.eval_tokens if corpus.eval_tokens is not None else corpus.tokens[-cfg.n_eval_seqs:]
    eval_tokens = eval_src[: cfg.n_eval_seqs]
    fit_tokens = _fit_rows(corpus.tokens, cfg.n_fit_tokens)
    key = _hash(cfg)
    path = run / "interventions.json"
    done: dict[int, dict] = {}
    if cfg.resume and path.exists():
        old = json.loads(path.read_text())
        if old.get("config_hash") == key:
            done = {int(s): v for s, v in old["snapshots"].items()}
    chosen = set(steps) if cfg.steps is None else set(cfg.steps)
    if chosen - set(steps):
        raise ValueError(f"[interventions] steps {sorted(chosen - set(steps))} are not snapshots of this run "
                         f"(it has {list(steps)})")
    effects_src = _crosscoder_sources(run, sorted(chosen)) if cfg.logit_effects else {}
    effects: dict[int, dict] = {}
    # effects_src holds only chosen steps: a chosen step runs when not done yet or when it has logit effects to rank
    todo = [(s, ld) for s, ld in zip(steps, loaders, strict=True) if s in chosen and (s not in done or s in effects_src)]
    bar = progress_bar(total=len(todo), desc="interventions", unit="snapshot")
    for step, loader in todo:
        model = loader()
        with tf32(model_device(model)):  # TF32 matmuls on CUDA for this snapshot's work (crosscoders.compute)
            if step in chosen and step not in done:
                res = block_interventions(model, fit_tokens, eval_tokens, cfg, corpus.bos_token_id)
                if cfg.logit_lens:
                    res["logit_lens"] = logit_lens(model, eval_tokens, cfg.eval_batch_size, corpus.bos_token_id)
                done[step] = res
                _write(path, done, cfg, key, complete=False)
            if step in effects_src:
                effects[step] = top_logit_effects(model, effects_src[step], cfg.top_k)
        dev = model_device(model)
        del model
        release_memory(dev)
        bar.update(1)
    bar.close()
    data = _write(path, {s: done[s] for s in steps if s in chosen}, cfg, key, complete=True)
    if effects:
        write_logit_effects(run, effects, corpus.tokenizer, cfg.top_k)
        _refresh_browser(run)
    from evolution.interventions.plots import plot_interventions
    from evolution.interventions.spikes import run_spikes

    plot_interventions(data, run / "figures")
    run_spikes(run)  # spikes.json: loss spikes of the pre-training log and ID around them (cheap)
    return data


def _crosscoder_sources(run: Path, steps: Sequence[int]) -> dict[int, torch.Tensor]:
    """{step: W_dec[s] [d_sae, d_in]} for the crosscoder's sources among `steps` (empty: no crosscoder)."""
    if not (run / "crosscoder" / "weights.safetensors").exists():
        return {}
    from crosscoders.model import Crosscoder
    from evolution.features.analyze import source_steps

    cc = Crosscoder.load(run / "crosscoder")
    src_steps = source_steps(run, cc.cfg.n_sources)
    return {s: cc.W_dec[j].detach().float() for j, s in enumerate(src_steps) if s in set(steps)}


def _refresh_browser(run: Path) -> None:
    """Redraw analysis/browser/index.html with the logit-effects tables (analyze drew it before they existed)."""
    a = run / "analysis"
    if not (a / "timelines.safetensors").exists() or not (a / "browser" / "index.html").exists():
        return
    from evolution.features.analyze import load_analysis
    from evolution.features.browser import load_contexts, load_logit_effects, write_browser

    tl, features, _ = load_analysis(run)
    recipe = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    write_browser(tl, features, a / "browser" / "index.html", load_contexts(a / "contexts.json"),
                  title=f"{run.resolve().name}: feature browser",
                  max_rows=recipe.get("analyze", {}).get("browser_max_rows", 1000),
                  logit_effects=load_logit_effects(a / "logit_effects.json", tl.d_sae))


def write_logit_effects(run: Path, effects: dict[int, dict], tokenizer, k: int) -> dict:
    steps = sorted(effects)
    ids = {t for e in effects.values() for f in e.values() for key in ("promoted", "suppressed") for t, _ in f[key]}
    vocab = {str(t): tokenizer.decode([t]) for t in sorted(ids)}
    feats = sorted(next(iter(effects.values())))
    data = {"steps": steps, "k": k, "vocab": vocab,
            "features": {str(i): {str(s): effects[s][i] for s in steps} for i in feats}}
    write_json(run / "analysis" / "logit_effects.json", data)
    return data


def _write(path: Path, done: dict[int, dict], cfg: InterventionsConfig, key: str, complete: bool) -> dict:
    steps = sorted(done)
    data = {"steps": steps, "config": to_dict(cfg), "config_hash": key, "complete": complete,
            "tolerance": cfg.tolerance, "snapshots": {str(s): done[s] for s in steps}}
    if complete and steps:
        data["replaceable_until"] = {m: replaceable_until(done, cfg.tolerance, m) for m in MODES}
    write_json(path, data)
    return data


def interventions_stage(ctx) -> None:
    """Linear replacement, pruning, logit lens and feature logit effects per snapshot, through the run's
    snapshot source (pretrain, local:, hf:)."""
    interventions(ctx.run_dir, ctx.steps, ctx.loaders(), ctx.cfg.interventions)
