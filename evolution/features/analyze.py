"""`feature-evolution analyze RUN`: timelines, the feature table, figures and the browser into `RUN/analysis/`.

Reads `RUN/crosscoder/` and the snapshot steps of its sources, then writes (atomically)

    analysis/timelines.safetensors   norms, rel_norms, cos_to_final, peak/emergence/fade/turn indices
    analysis/features.csv            one row per feature (+ type scores when the probes ran)
    analysis/summary.json            turning point, steps, group counts, medians (docs/architecture.md)
    analysis/contexts.json, probe_scores.safetensors   (evolution.features.probes, when snapshots and corpus exist)
    analysis/figures/*.png           heatmap, peak_steps, timelines_by_group[, _by_type], cos_to_final
    analysis/browser/index.html      the feature browser

The probes need the snapshots (the run's snapshot source: `RUN/snapshots/step{N}/`, `local:` or `hf:`), the
corpus (`RUN/corpus/`) and the hook (from the activation store's manifest); without them the analysis runs
on the decoder alone and says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crosscoders.compute import release_memory
from crosscoders.io import atomic_path, write_json
from evolution.features.hierarchy import clear_mechanism
from evolution.features.timelines import TimelineConfig, Timelines, compute_timelines


@dataclass
class AnalyzeConfig(TimelineConfig):
    """What `analyze` computes besides the timelines (whose settings it inherits)."""

    figures: bool = True
    """Write the PNG figures under analysis/figures/."""
    browser: bool = True
    """Write the HTML feature browser analysis/browser/index.html."""
    probes: bool = True
    """Run the feature probes (type scores, top contexts) when snapshots, corpus and hook are available."""
    probe_snapshots: int = 0
    """Probe this many snapshots, evenly spaced with the first and last included (0 = every snapshot)."""
    probe_max_seqs: int = 256
    """Sequences of the held-out corpus the probes read."""
    browser_max_rows: int = 1000
    """Rows the browser's table draws at once (the filter reaches every feature)."""
    device: str = "cpu"
    """Torch device for the probes."""
    type_min_lift: float = 1.5
    """`peak_step_by_clear_type` keeps features whose activation falls on their type's tokens at least this
    many times the type's base rate."""
    latent_scaling: bool = True
    """Latent Scaling (Minder et al. 2025) on the held-out store: analysis/latent_scaling.safetensors and the
    columns ls_flagged, ls_onset_step (evolution.features.scaling)."""
    latent_scaling_max_tokens: int = 16384
    """Held-out tokens Latent Scaling reads."""


def _step_of(name: Any) -> int | None:
    if isinstance(name, int):
        return name
    m = re.fullmatch(r"(?:.*[^\d])?(\d+)", str(name))
    return int(m.group(1)) if m else None


def _manifests(run: Path) -> list[dict]:
    out = []
    for p in sorted((run / "activations").glob("*/manifest.json")):
        try:
            out.append(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from e
    return out


def source_steps(run_dir: str | Path, n_sources: int) -> list[int]:
    """The training step of each crosscoder source, from the names of the sources ("step512" or 512)
    in crosscoder/eval.json or the activation store's manifest, else the snapshot directories."""
    run = Path(run_dir)
    candidates: list[tuple[str, Any]] = []
    ev = run / "crosscoder" / "eval.json"
    if ev.exists():
        candidates.append((str(ev), json.loads(ev.read_text()).get("sources")))
    candidates += [(f"{run}/activations/*/manifest.json", m.get("sources")) for m in _manifests(run)]
    for _where, names in candidates:
        if names and len(names) == n_sources:
            steps = [_step_of(n) for n in names]
            if all(s is not None for s in steps):
                return steps  # type: ignore[return-value]
    from evolution.sources.snapshot_source import SnapshotError, SnapshotSource

    try:
        src = SnapshotSource.for_run(run)
        if len(found := src.steps) == n_sources:
            return found
        where = src.source
    except SnapshotError as e:
        where = str(e)
    tried = ", ".join(w for w, _ in candidates) or "no eval.json or manifest"
    raise ValueError(f"cannot tell the training steps of the {n_sources} crosscoder sources of {run} "
                     f"(looked at {tried} and the run's snapshots: {where})")


def _hook(run: Path) -> str | None:
    for m in _manifests(run):
        if m.get("hook"):
            return m["hook"]
    return None


def _harvest_autocast(run: Path) -> str:
    """The probes' forwards run in the precision the harvest recorded in the store manifest."""
    from evolution.features.snapshot_acts import harvest_autocast

    return next((harvest_autocast(m) for m in _manifests(run) if m.get("hook")), "none")


def _evenly(steps: list[int], n: int) -> list[int]:
    if n <= 0 or n >= len(steps):
        return list(steps)
    return [steps[i] for i in sorted(set(np.linspace(0, len(steps) - 1, n).round().astype(int).tolist()))]


def run_probes(run: Path, crosscoder, steps: list[int], cfg: AnalyzeConfig, source
               ) -> tuple[pd.DataFrame, dict, object] | None:
    """Probe statistics, top contexts (evolution.features.probes) and the encoded token sets, which cover the type
    probe's too (`snapshot_acts.PreActs`), or None with the reason printed when the
    run lacks snapshots, corpus or hook (a run on the decoder alone); any other failure fails the stage. The snapshots come from the run's
    snapshot source (`source`: the run context's, pretrain, local: or hf:)."""
    from evolution.sources.snapshot_source import SnapshotError

    hook = _hook(run)
    try:
        has_snapshots = bool(source.with_steps(steps).steps)
    except SnapshotError:
        has_snapshots = False
    missing = [what for what, ok in ((f"snapshots ({source.source})", has_snapshots),
                                     ("corpus/", (run / "corpus").is_dir()), ("hook in a store manifest", hook))
               if not ok]
    if missing:
        print(f"analyze: probes skipped, {run} has no {', '.join(missing)}")
        return None
    # a failure here fails the stage
    from evolution.features.probes import ProbeConfig, probe_features, probe_token_sets
    from evolution.features.snapshot_acts import encode_token_sets
    from evolution.features.type_probe import type_token_sets
    from evolution.features.types import TypeConfig
    from evolution.sources.corpus import Corpus

    corpus = Corpus.load(run / "corpus")
    source.check_corpus(corpus)  # the probe stream must be the snapshots' tokens (before any model runs)
    tokens, mech = corpus.eval_tokens, corpus.eval_mechanism
    kwargs = {"mechanism_names": corpus.mechanism_names} if corpus.mechanism_names else {}
    probe_steps = _evenly(steps, cfg.probe_snapshots)
    pcfg = ProbeConfig(max_seqs=cfg.probe_max_seqs, autocast=_harvest_autocast(run))
    bos = corpus.bos_token_id if corpus.bos_token_id is not None else int(tokens[0, 0])
    # one pass over every source's snapshot (the pre-activation is shared) for the probes and the type probe:
    # their token sets overlap, and each pass loads and runs every snapshot
    pre_acts = encode_token_sets(
        crosscoder.to(cfg.device), source.iter(steps, device=cfg.device),
        lambda n_ctx: probe_token_sets(tokens, n_ctx, pcfg, bos)
        + type_token_sets(tokens[: cfg.probe_max_seqs], n_ctx, bos, seed=TypeConfig().seed),
        hook, steps, pcfg.batch_size, autocast=pcfg.autocast)
    result = probe_features(crosscoder, None, tokens, hook, mechanism=mech, steps=steps, cfg=pcfg,
                            tokenizer=corpus.tokenizer, bos_token_id=bos, probe_steps=probe_steps, pre_acts=pre_acts,
                            **kwargs)  # only `probe_steps` are scored
    result.save(run / "analysis")
    return result.table, result.contexts, pre_acts


def peak_step_by_type(features: pd.DataFrame, min_lift: float = 0.0) -> dict[str, dict[str, float]] | None:
    """Median and mean peak step of alive features per ground-truth type (planted corpus).

    `min_lift` keeps the features clearly of their type (`hierarchy.clear_mechanism`: lift over the base rate,
    and over the token-matched share for copy and topic). The argmax label alone also types features that
    fire everywhere (their lift is ~1) by whichever mechanism is most common."""
    if "gt_type" not in features:
        return None
    alive = features[~features["dead"].astype(bool)]
    if min_lift > 0:
        alive = alive.assign(gt_type=clear_mechanism(alive, min_lift)).dropna(subset=["gt_type"])
    g = alive.groupby("gt_type")["peak_step"]
    return {str(t): {"median": float(m), "mean": float(a), "n": int(n)}
            for (t, m), a, n in zip(g.median().items(), g.mean(), g.size(), strict=True)}


def analyze(run_dir: str | Path, cfg: AnalyzeConfig | None = None, source=None) -> dict:
    """Write the analysis of `run_dir` (see the module docstring); returns the summary. `source`: the run's
    `SnapshotSource` (the stage passes its context's; default: the one its run.json names)."""
    from crosscoders.model import Crosscoder
    from evolution.sources.snapshot_source import SnapshotSource

    cfg = cfg or AnalyzeConfig()
    run = Path(run_dir)
    source = source if source is not None else SnapshotSource.for_run(run, device=cfg.device)
    crosscoder = Crosscoder.load(run / "crosscoder")
    steps = source_steps(run, crosscoder.cfg.n_sources)
    out = run / "analysis"
    tl_cfg = TimelineConfig(**{k: getattr(cfg, k) for k in TimelineConfig.__dataclass_fields__})
    tl = compute_timelines(crosscoder, steps, tl_cfg)
    features = tl.to_frame()
    # between the phases below, freed heap goes back to the system: each phase's transients are W_dec-sized or
    # larger, and glibc kept what one left as resident beside the next (Pythia-160M width: +0.9 GiB at the peak)
    release_memory(cfg.device)
    contexts = pre_acts = None
    if cfg.probes and (probed := run_probes(run, crosscoder, steps, cfg, source)) is not None:
        table, contexts, pre_acts = probed
        del probed  # the pre-activations must go when pre_acts does
        extra = [c for c in table.columns if c == "feature" or c not in features.columns]
        features = features.merge(table[extra], on="feature", how="left")
    if cfg.probes:  # null-calibrated type scores per snapshot (evolution.features.types)
        from evolution.features.type_probe import types_for_run

        cols = types_for_run(run, crosscoder, steps, _evenly(steps, cfg.probe_snapshots), _hook(run),
                             cfg.probe_max_seqs, cfg.device, source=source, autocast=_harvest_autocast(run),
                             pre_acts=pre_acts)
        pre_acts = None  # the pre-activations go before Latent Scaling runs
        release_memory(cfg.device)
        for k, v in (cols or {}).items():
            features[k] = v
        if cols:
            features["type_onset_step"] = features["type_onset_step"].astype("Int64")
    if cfg.latent_scaling:
        from evolution.features.scaling import latent_scaling_for_run

        ls = latent_scaling_for_run(run, crosscoder, steps, _hook(run), cfg.latent_scaling_max_tokens)
        for k, v in (ls or {}).items():
            features[k] = v
        if ls:
            features["ls_onset_step"] = features["ls_onset_step"].astype("Int64")
    tl.save(out / "timelines.safetensors")
    with atomic_path(out / "features.csv") as tmp:
        features.to_csv(tmp, index=False)
    summary = {**tl.summary(), "probes": contexts is not None, "run": str(run)}
    if "ls_flagged" in features:
        summary["latent_scaling"] = {"n_features_flagged": int((features["ls_flagged"] > 0).sum()),
                                     "n_flagged_snapshots": int(features["ls_flagged"].sum())}
    if (by_type := peak_step_by_type(features)) is not None:
        summary["peak_step_by_type"] = by_type
        summary["peak_step_by_clear_type"] = peak_step_by_type(features, cfg.type_min_lift)
        summary["type_min_lift"] = cfg.type_min_lift
    if "type" in features:  # the features typed induction (their null-referenced score passes)
        ind = features[~features["dead"].astype(bool) & (features["type"] == "induction")]
        summary["peak_step_induction_features"] = {
            "n": len(ind),
            "median": float(ind["peak_step"].median()) if len(ind) else None,
            "mean": float(ind["peak_step"].mean()) if len(ind) else None}
    from evolution.features.hierarchy import hierarchy_summary

    summary["hierarchy"] = hierarchy_summary(run, features, steps, out / "figures" if cfg.figures else None)
    write_json(out / "summary.json", summary)
    if cfg.figures:
        from evolution.features.plots import save_all

        save_all(tl, features, out / "figures")
    if cfg.browser:
        from evolution.features.browser import load_logit_effects, write_browser

        write_browser(tl, features, out / "browser" / "index.html", contexts,
                      title=f"{run.resolve().name}: feature browser", max_rows=cfg.browser_max_rows,
                      logit_effects=load_logit_effects(out / "logit_effects.json", tl.d_sae), gate=crosscoder.cfg.gate)
    return summary


def load_analysis(run_dir: str | Path) -> tuple[Timelines, pd.DataFrame, dict]:
    """(timelines, features table, summary) as `analyze` wrote them."""
    a = Path(run_dir) / "analysis"
    tl = Timelines.load(a / "timelines.safetensors")
    features = pd.read_csv(a / "features.csv")
    for col in ("emergence_step", "fade_step", "turn_step", "ls_onset_step", "type_onset_step"):
        if col in features:
            features[col] = features[col].astype("Int64")
    summary = json.loads((a / "summary.json").read_text()) if (a / "summary.json").exists() else {}
    return tl, features, summary


def analyze_stage(ctx) -> None:
    """The analyze stage: timelines, types, Latent Scaling, figures and the browser from crosscoder/."""
    analyze(ctx.run_dir, ctx.cfg.analyze, source=ctx.source)
