"""Phase signals read off the evaluate stage's `eval/` (evolution/evaluate): loss and KL curves with bootstrap
CIs, the loss crossing the held-out bigram reference, where the model stops tracking the bigram distribution."""

from __future__ import annotations

import numpy as np

from evolution.evaluate.snapshots import per_sequence
from evolution.phases.signals import crossing, interior_min, stops_tracking


def _units(ev: dict, values: np.ndarray, unit: str) -> np.ndarray:
    return per_sequence(values, ev["seq"]) if unit == "sequence" else values


def kl_curves(ev: dict, unit: str = "sequence", n_boot: int = 200, seed: int = 0) -> dict:
    """Per snapshot: mean and 95% bootstrap CI of the loss and of the KL to the unigram / bigram
    distributions, with the held-out references; the interior minimum of KL(model ‖ unigram)."""
    rng = np.random.default_rng(seed)
    out: dict = {"steps": ev["steps"], "resample_unit": unit, "alpha": ev["summary"]["alpha"]}
    for name in ("nll", "kl_unigram", "kl_bigram"):
        v = _units(ev, ev[name], unit)
        boots = np.stack([v[rng.integers(len(v), size=len(v))].mean(0) for _ in range(n_boot)])
        lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
        out[name] = {"mean": v.mean(0).tolist(), "ci_low": lo.tolist(), "ci_high": hi.tolist()}
    for name in ("unigram_nll", "bigram_nll"):
        out[f"heldout_{name}"] = float(ev[name].astype(np.float64).mean())
    out["kl_unigram_min"] = interior_min(_units(ev, ev["kl_unigram"], unit), ev["steps"], n_boot, seed)
    return out


def eval_signals(ev: dict, n_boot: int = 200, unit: str = "sequence") -> dict[str, dict]:
    """The phase signals read off `eval/`: the loss crossing the held-out bigram reference, and where the
    model stops tracking the bigram distribution (`phases.signals.crossing`, `stops_tracking`)."""
    steps = ev["steps"]
    d = _units(ev, ev["nll"] - ev["bigram_nll"].astype(np.float64)[:, None], unit)
    ref = float(ev["bigram_nll"].astype(np.float64).mean())
    loss = crossing(d, steps, n_boot) | {"reference": ref, "reference_name": "held-out add-α bigram cross-entropy",
                                         "resample_unit": unit}
    kl = stops_tracking(_units(ev, ev["kl_bigram"], unit), steps, n_boot) | {"resample_unit": unit}
    return {"loss_below_bigram": loss, "kl_bigram_stop": kl}
