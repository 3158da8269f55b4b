"""Layer geometry per snapshot: linearity (± residual), anisotropy and intrinsic dimension per layer.

`model_geometry(model, tokens)` measures one model (a TransformerLens `HookedTransformer` or a Hugging
Face causal LM); `geometry(run_dir, cfg)` streams a run's snapshots through it, one model in memory at
a time, and writes `geometry.json` and `figures/geometry_*.png`.

Layers are residual-stream points: layer l < L is `blocks.{l}.hook_resid_pre` (l = 0 is the token +
position embedding), layer L is `blocks.{L-1}.hook_resid_post` (before the final LayerNorm). Pair
metrics (linearity) are stored at the *source* layer: `linearity[l]` is block l's map from layer l to
layer l+1, and the entry at layer L is null. Definitions: `evolution/geometry/layer_metrics`,
`evolution/geometry/intrinsic_dim`.

Tokens: the same `n_tokens` positions of the corpus's eval split are sampled (seeded) for every
snapshot and layer, BOS excluded by default: the BOS position's residual stream is a huge-norm
attention sink that would dominate centring, the top singular value and the least-squares fit.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from crosscoders.compute import model_device, release_memory
from crosscoders.dataclass_cli import config_hash, to_dict
from crosscoders.io import write_json
from crosscoders.progress import progress_bar
from evolution.geometry.intrinsic_dim import intrinsic_dims
from evolution.geometry.layer_metrics import anisotropy, linearity_and_anisotropy, linearity_pair
from evolution.sources.residual import decoder_layers, hf_residual

PAIR_METRICS = ("linearity", "linearity_no_residual", "linearity_heldout", "linearity_no_residual_heldout",
                "token_nonlinearity_p90", "token_nonlinearity_max")
RESAMPLED = ("linearity_no_residual", "anisotropy", "id_twonn", "id_mle")
"""Metrics behind a phase signal, also measured on `n_resamples` random halves of the tokens (their CIs)."""
GEOMETRY_VERSION = 2  # bump when the metrics recorded per snapshot change (resume must not mix versions)
POINT_METRICS = ("anisotropy", "id_twonn", "id_mle", "duplicate_frac", "mean_norm")
FIGURE_METRICS = ("linearity", "linearity_no_residual", "anisotropy", "id_twonn", "id_mle")


@dataclass
class GeometryConfig:
    n_tokens: int = 4096
    """Token positions sampled (the same ones for every snapshot and layer); needs n_tokens ≫ d_model
    for the linear fit to mean anything."""
    batch_size: int = 16
    """Sequences per forward pass."""
    exclude_bos: bool = True
    """Drop position 0 (BOS): its huge-norm residual would dominate every metric."""
    discard_fraction: float = 0.1
    """TwoNN: share of the largest r2/r1 ratios left out of the fit (Facco et al. 2017)."""
    mle_k1: int = 10
    """MLE intrinsic dimension: smallest neighbourhood size."""
    mle_k2: int = 20
    """MLE intrinsic dimension: largest neighbourhood size."""
    steps: list[int] | None = None
    """Snapshot steps to measure (default: all of the run's snapshot source)."""
    seed: int = 0
    """Seed of the token-position sample."""
    device: str = "cpu"
    """Device the models run on; the residual streams stay there and every metric is computed there, in
    float64 (layer_metrics and intrinsic_dim say why), so on "cuda" nothing large crosses to the host."""
    resume: bool = True
    """Keep steps already in geometry.json when it was written with the same config."""
    n_resamples: int = 10
    """Random halves of the sampled tokens on which the signal metrics (RESAMPLED) are measured again, for
    the phase signals' CIs (0: none). Half-samples have twice the variance of the full sample, so these
    CIs are conservative."""


# ---------------------------------------------------------------- residual streams


def sample_positions(n_seq: int, seq_len: int, n_tokens: int, exclude_bos: bool, seed: int) -> Int[Tensor, "n 2"]:
    """`n_tokens` distinct (sequence, position) pairs, sorted, seeded; all of them if fewer exist."""
    first = 1 if exclude_bos else 0
    total = n_seq * (seq_len - first)
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(total, generator=g)[: min(n_tokens, total)].sort().values
    return torch.stack([flat // (seq_len - first), flat % (seq_len - first) + first], 1)


def collect_resid(
    model: torch.nn.Module,
    tokens: Int[Tensor, "n_seq seq_len"],
    positions: Int[Tensor, "n 2"],
    batch_size: int = 16,
) -> tuple[Float[Tensor, "n_layers_plus_1 n d_model"], list[str]]:
    """Residual stream at every layer for the sampled positions, float32 on the model's device (the metrics
    run there), plus the hook names."""
    from transformer_lens import HookedTransformer

    hooked = isinstance(model, HookedTransformer)
    n_layers = model.cfg.n_layers if hooked else len(decoder_layers(model))
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]
    device = model_device(model)
    positions, tokens = positions.to(device), tokens.to(device)  # token ids: small
    seqs = positions[:, 0].unique()
    out: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            batch_seqs = seqs[start : start + batch_size]
            batch = tokens[batch_seqs]
            if hooked:
                # stop before ln_final and the unembedding: their [batch, seq, vocab] logits are unused
                # (412 MB a sequence pair at Pythia's 50,304 tokens, and the cost of three blocks)
                _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names, stop_at_layer=n_layers)
                acts = [cache[n] for n in names]
            else:
                acts = hf_residual(model, batch)[1]
            rows = positions[torch.isin(positions[:, 0], batch_seqs)]
            local = torch.searchsorted(batch_seqs, rows[:, 0].contiguous())
            out.append(torch.stack([a[local, rows[:, 1]].float() for a in acts]))
    return torch.cat(out, 1), names


# ---------------------------------------------------------------- metrics


def resampled_metrics(resid: Float[Tensor, "n_layers_plus_1 n d_model"], cfg: GeometryConfig) -> dict[str, list]:
    """{metric: [[value per layer] per resample]} for RESAMPLED, each resample a seeded random half of the tokens."""
    out: dict[str, list] = {m: [] for m in RESAMPLED}
    n_points, n = resid.shape[0], resid.shape[1]
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.n_resamples):
        half = torch.randperm(n, generator=g)[: n // 2].to(resid.device)
        sub = resid[:, half]
        rows: dict[str, list] = {m: [] for m in RESAMPLED}
        for layer in range(n_points):
            X = sub[layer]
            lin, aniso = (linearity_and_anisotropy(X, sub[layer + 1], residual=False) if layer + 1 < n_points
                          else (None, anisotropy(X)))
            rows["linearity_no_residual"].append(lin)
            rows["anisotropy"].append(aniso)
            ids = intrinsic_dims(X, cfg.discard_fraction, cfg.mle_k1, cfg.mle_k2)
            rows["id_twonn"].append(ids["id_twonn"])
            rows["id_mle"].append(ids["id_mle"])
        for m in RESAMPLED:
            out[m].append(rows[m])
    return out


def resid_metrics(resid: Float[Tensor, "n_layers_plus_1 n d_model"], cfg: GeometryConfig) -> dict[str, list]:
    """Every metric per layer (pair metrics at their source layer, null at the last)."""
    n_points = resid.shape[0]
    metrics: dict[str, list] = {m: [] for m in PAIR_METRICS + POINT_METRICS}
    for layer in progress_bar(range(n_points), desc="layers", unit="layer", leave=False):
        X = resid[layer]
        pair = linearity_pair(X, resid[layer + 1], cfg.seed) if layer + 1 < n_points else dict.fromkeys(PAIR_METRICS + ("anisotropy",))
        for m in PAIR_METRICS:
            metrics[m].append(pair[m])
        ids = intrinsic_dims(X, cfg.discard_fraction, cfg.mle_k1, cfg.mle_k2)
        metrics["anisotropy"].append(pair["anisotropy"] if pair["anisotropy"] is not None else anisotropy(X))
        metrics["id_twonn"].append(ids["id_twonn"])
        metrics["id_mle"].append(ids["id_mle"])
        metrics["duplicate_frac"].append(ids["duplicate_frac"])
        metrics["mean_norm"].append(X.double().norm(dim=1).mean().item())
    return metrics


def model_geometry(
    model: torch.nn.Module, tokens: Int[Tensor, "n_seq seq_len"], cfg: GeometryConfig | None = None
) -> dict:
    """Per-layer geometry of one model (HookedTransformer or HF causal LM) on `tokens`:
    `{"layers", "hooks", "n_tokens", "metrics": {name: [value per layer]}}`."""
    cfg = cfg or GeometryConfig()
    positions = sample_positions(*tokens.shape, cfg.n_tokens, cfg.exclude_bos, cfg.seed)
    resid, names = collect_resid(model, tokens, positions, cfg.batch_size)
    n, d = resid.shape[1], resid.shape[2]
    if n < 10 * d:
        warnings.warn(f"geometry on {n} tokens for d_model {d}: fewer than 10 × d_model, so the in-sample linearity "
                      "is inflated by overfitting (see linearity_heldout) and ID/anisotropy are noisy; raise n_tokens",
                      stacklevel=2)
    metrics = resid_metrics(resid, cfg)
    if cfg.n_resamples:
        metrics["resamples"] = resampled_metrics(resid, cfg)
    return {
        "layers": list(range(len(names))),
        "hooks": names,
        "n_tokens": int(positions.shape[0]),
        "metrics": metrics,
    }


# ---------------------------------------------------------------- a run's snapshots


def _eval_tokens(run_dir: Path) -> Tensor:
    from safetensors.torch import load_file

    path = run_dir / "corpus" / "tokens.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the corpus first (feature-evolution corpus)")
    t = load_file(str(path))
    return t["eval_tokens"] if "eval_tokens" in t else t["tokens"]


def geometry(run_dir: str | Path, cfg: GeometryConfig | None = None, source=None) -> dict:
    """Measure every snapshot of `run_dir` (one model in memory at a time), write `geometry.json` after
    each snapshot (so an interrupted job resumes) and `figures/geometry_<metric>.png`. `source`: a
    `SnapshotSource` (default: the run's own, `SnapshotSource.for_run`: pretrain, local: or hf:)."""
    from evolution.sources.snapshot_source import SnapshotSource

    cfg = cfg or GeometryConfig()
    run_dir = Path(run_dir)
    source = source if source is not None else SnapshotSource.for_run(run_dir, device=cfg.device)
    steps = sorted(cfg.steps) if cfg.steps is not None else source.steps
    tokens = _eval_tokens(run_dir)
    if (run_dir / "corpus" / "tokenizer").is_dir():  # the token stream must be the snapshots' (before any model runs)
        from transformers import PreTrainedTokenizerFast

        source.check_tokens(PreTrainedTokenizerFast.from_pretrained(str(run_dir / "corpus" / "tokenizer")),
                            int(tokens.max()), "the corpus")
    key = config_hash({**{k: v for k, v in to_dict(cfg).items() if k not in ("resume", "device", "steps")},
                       "version": GEOMETRY_VERSION})
    out_path = run_dir / "geometry.json"
    done: dict[int, dict] = {}
    header: dict = {}
    if cfg.resume and out_path.exists():
        old = json.loads(out_path.read_text())
        if old.get("config_hash") == key:
            header = {k: old[k] for k in ("layers", "hooks", "n_tokens")}
            for i, s in enumerate(old["steps"]):
                done[s] = {m: v[i] for m, v in old["metrics"].items()}
                if old.get("resamples"):
                    done[s]["resamples"] = {m: v[i] for m, v in old["resamples"].items()}
    todo = [s for s in steps if s not in done]
    bar = progress_bar(total=len(steps), initial=len(steps) - len(todo), desc="geometry", unit="snapshot")
    for step, model in source.iter(todo, device=cfg.device) if todo else []:
        result = model_geometry(model, tokens, cfg)
        del model
        release_memory(cfg.device)
        header = {"layers": result["layers"], "hooks": result["hooks"], "n_tokens": result["n_tokens"]}
        done[step] = result["metrics"]
        _write(out_path, done, header, cfg, key, complete=False)
        bar.update(1)
    bar.close()
    data = _write(out_path, {s: done[s] for s in steps}, header, cfg, key, complete=True)
    plot_geometry(data, run_dir / "figures")
    return data


def _write(path: Path, done: dict[int, dict], header: dict, cfg: GeometryConfig, key: str, complete: bool) -> dict:
    steps = sorted(done)
    names = [m for m in next(iter(done.values())) if m != "resamples"]
    resampled = "resamples" in next(iter(done.values()))
    data = {
        "steps": steps,
        **header,
        "metrics": {m: [done[s][m] for s in steps] for m in names},
        **({"resamples": {m: [done[s]["resamples"][m] for s in steps] for m in RESAMPLED}} if resampled else {}),
        "config": to_dict(cfg),
        "config_hash": key,
        "complete": complete,
    }
    write_json(path, _finite(data))
    return data


def _finite(obj):
    """NaN / inf → null, so geometry.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------- figures


def log_step_edges(steps: list[int]) -> list[float]:
    """Cell edges on a log(1 + step) axis, halfway (geometrically) between neighbouring snapshots."""
    u = [math.log10(1 + s) for s in steps]
    if len(u) == 1:
        return [u[0] - 0.5, u[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(u, u[1:], strict=False)]
    return [u[0] - (mids[0] - u[0])] + mids + [u[-1] + (u[-1] - mids[-1])]


def geometry_heatmap(data: dict, metric: str, ax=None):
    """Metric × layer against step (x: log(1 + step), ticks labelled with steps)."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = ax.figure if ax is not None else Figure(figsize=(8, 3.5))
    ax = ax or fig.add_subplot()
    vals = np.array([[np.nan if v is None else v for v in row] for row in data["metrics"][metric]], float)
    layers = data["layers"]
    if metric in PAIR_METRICS:  # pair metrics live at layers 0..L-1
        vals, layers = vals[:, :-1], layers[:-1]
    y = [layers[0] - 0.5] + [v + 0.5 for v in layers]
    mesh = ax.pcolormesh(log_step_edges(data["steps"]), y, vals.T, shading="flat", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label=metric)
    ticks = [s for s in data["steps"] if s == 0 or math.log2(max(s, 1)).is_integer() or s == data["steps"][-1]]
    ax.set_xticks([math.log10(1 + s) for s in ticks], [str(s) for s in ticks], rotation=45, fontsize=7)
    ax.set_yticks(layers)
    ax.set_xlabel("step (log scale)")
    ax.set_ylabel("block (l → l+1)" if metric in PAIR_METRICS else "layer (resid_pre l)")
    ax.set_title(metric)
    return fig


def plot_geometry(data: dict, fig_dir: str | Path) -> list[Path]:
    from evolution.figures import save_figure

    paths = []
    for metric in FIGURE_METRICS:
        if metric not in data["metrics"]:
            continue
        fig = geometry_heatmap(data, metric)
        fig.tight_layout()
        path = Path(fig_dir) / f"geometry_{metric}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def geometry_stage(ctx) -> None:
    """The geometry stage on the run's snapshot source (`[geometry] device` for the forward passes)."""
    geometry(ctx.run_dir, ctx.cfg.geometry, source=ctx.source)
