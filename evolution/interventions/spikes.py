"""Loss spikes in the pre-training log, and the intrinsic dimension per layer in the snapshots around each
(Razzhigaev et al. 2024, *The Shape of Learning*: ID rises a little before loss spikes).

Rule (`detect_spikes`): at step t (after the first `window` steps) let m and MAD be the median and the
median absolute deviation of the train loss over the previous `window` steps (robust to the spike itself
and to the slow downward trend over one window). Step t is *spiking* when

    loss_t − m > max(k · 1.4826 · MAD, min_jump)

(1.4826 · MAD estimates the noise's σ for Gaussian noise; `min_jump` keeps a perfectly smooth curve's
tiny wiggles out). Consecutive spiking steps (gaps ≤ `merge_gap`) form one spike: {start, peak (step of
the largest excess), end, height (largest excess, nats)}.

`spike_geometry` pairs each spike with the last snapshot at or before its start and the first snapshot
after its end that geometry.json holds, and reports ID (TwoNN and MLE) per layer at both and the change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class SpikeConfig:
    window: int = 50
    """Steps of the trailing window giving the baseline median and MAD."""
    k: float = 6.0
    """Threshold in robust standard deviations above the trailing median."""
    min_jump: float = 0.05
    """Smallest excess (nats) that counts, whatever the noise."""
    merge_gap: int = 3
    """Spiking steps at most this far apart belong to one spike."""


def detect_spikes(steps: list[int] | np.ndarray, loss: list[float] | np.ndarray, cfg: SpikeConfig | None = None) -> list[dict]:
    """Spikes of a loss curve by the rule of the module docstring."""
    cfg = cfg or SpikeConfig()
    steps, loss = np.asarray(steps), np.asarray(loss, float)
    flagged: list[tuple[int, float]] = []
    for i in range(cfg.window, len(loss)):
        past = loss[i - cfg.window : i]
        m = np.median(past)
        mad = np.median(np.abs(past - m))
        excess = loss[i] - m
        if excess > max(cfg.k * 1.4826 * mad, cfg.min_jump):
            flagged.append((i, excess))
    spikes: list[dict] = []
    for i, ex in flagged:
        if spikes and steps[i] - spikes[-1]["end"] <= cfg.merge_gap:
            s = spikes[-1]
            s["end"] = int(steps[i])
            if ex > s["height"]:
                s["height"], s["peak"] = float(ex), int(steps[i])
        else:
            spikes.append({"start": int(steps[i]), "peak": int(steps[i]), "end": int(steps[i]), "height": float(ex)})
    return spikes


def spike_geometry(spikes: list[dict], geometry: dict) -> list[dict]:
    """Each spike with ID per layer in the snapshots just before and just after it (module docstring)."""
    steps = geometry["steps"]
    out = []
    for sp in spikes:
        before = [i for i, s in enumerate(steps) if s <= sp["start"]]
        after = [i for i, s in enumerate(steps) if s > sp["end"]]
        row = dict(sp)
        for name, idx in (("before", before[-1] if before else None), ("after", after[0] if after else None)):
            row[f"snapshot_{name}"] = None if idx is None else steps[idx]
            for m in ("id_twonn", "id_mle"):
                row[f"{m}_{name}"] = None if idx is None else geometry["metrics"][m][idx]
        if row["snapshot_before"] is not None and row["snapshot_after"] is not None:
            row["id_twonn_change"] = [None if a is None or b is None else b - a
                                      for a, b in zip(row["id_twonn_before"], row["id_twonn_after"], strict=True)]
        out.append(row)
    return out


def run_spikes(run: str | Path, cfg: SpikeConfig | None = None) -> dict:
    """`spikes.json` of a run: the spikes of pretrain/log.jsonl's train loss and, where geometry.json exists,
    ID per layer around each. Empty when the run has no pre-training log."""
    import json

    from crosscoders.io import read_jsonl, write_json

    run = Path(run)
    log = run / "pretrain" / "log.jsonl"
    if not log.exists():
        return {}
    cfg = cfg or SpikeConfig()
    rows = [r for r in read_jsonl(log) if "train_loss" in r]
    spikes = detect_spikes([r["step"] for r in rows], [r["train_loss"] for r in rows], cfg)
    geo = run / "geometry.json"
    if geo.exists():
        spikes = spike_geometry(spikes, json.loads(geo.read_text()))
    from dataclasses import asdict

    data = {"rule": asdict(cfg), "n_steps": len(rows), "spikes": spikes}
    write_json(run / "spikes.json", data)
    return data
