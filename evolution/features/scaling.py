"""Latent Scaling on a run (Minder et al. 2025; `crosscoders.latent_scaling`): for every latent and snapshot,
the least-squares scale beta[s, i] with which the latent's decoder direction explains snapshot s's held-out
activations, next to its decoder norm there.

Written to `analysis/latent_scaling.safetensors` (beta_activation, beta_error, norm: [d_sae, n_sources] in raw
activation units; flagged: bool) and to two feature-table columns:

- `ls_flagged`: snapshots where the norm says "absent" (< `absent_frac` x the latent's peak norm) while beta
  says "present" (>= `present_frac` x the peak norm): the decoder norm under-reads the feature there.
- `ls_onset_step`: the first snapshot where beta_activation >= `present_frac` x its maximum over snapshots,
  the data-side counterpart of the decoder-norm rising edge (`emergence_step`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crosscoders.io import save_safetensors


def latent_scaling_rows(n_sources: int, d_sae: int) -> int:
    """Held-out rows per Latent Scaling batch: at most 1,024, and at most HANDOUT_ELEMENTS values per code."""
    from evolution.features.snapshot_acts import HANDOUT_ELEMENTS

    return max(1, min(1024, HANDOUT_ELEMENTS // (n_sources * d_sae)))


def latent_scaling_for_run(run: Path, crosscoder, steps: list[int], hook: str | None, max_tokens: int = 16384,
                           absent_frac: float = 0.2, present_frac: float = 0.5) -> dict | None:
    """Feature-table columns from Latent Scaling on the run's held-out activation store, or None (printed why)
    when the run has no such store."""
    from crosscoders.latent_scaling import latent_scaling
    from crosscoders.store import ActivationStore

    path = Path(run) / "activations_eval" / str(hook)
    if hook is None or not (path / "manifest.json").exists():
        print(f"analyze: latent scaling skipped, no held-out activation store at {path}")
        return None
    store = ActivationStore(path)
    store.check_matches(crosscoder.cfg.n_sources, crosscoder.cfg.d_in)
    # rows per batch: latent_scaling holds ~6 [rows, n_sources, d_sae] float32 tensors at once (the code, both
    # projections, the latent's own contribution and einsum temporaries), so a batch is bounded by HANDOUT_ELEMENTS
    # values each (256 MiB): 341 rows at 8 x 24,576, 85 at Pythia-160M's 32 snapshots, 1,024 on the demo
    batch = latent_scaling_rows(crosscoder.cfg.n_sources, crosscoder.cfg.d_sae)
    n_batches = max(1, min(max_tokens, store.n_tokens) // batch)

    def batches():
        for i, x in enumerate(store.batches(batch, seed=0, normalize=False, n_epochs=1)):
            if i >= n_batches:
                return
            yield x

    out = latent_scaling(crosscoder, batches(), absent_frac=absent_frac, present_frac=present_frac)
    save_safetensors(Path(run) / "analysis" / "latent_scaling.safetensors",
                     {k: v.float().contiguous() for k, v in out.items()})
    beta = out["beta_activation"].numpy()
    top = beta.max(1, keepdims=True)
    present = (beta >= present_frac * top) & (top > 0)
    onset = [int(steps[int(row.argmax())]) if row.any() else None for row in present]
    return {"ls_flagged": out["flagged"].sum(1).numpy().astype(int), "ls_onset_step": np.array(onset, dtype=object)}
