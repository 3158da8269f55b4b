"""The crosscoder stage's last word: is the dictionary degenerate? Checked on the held-out evaluation against
stated bars; a failure warns in the log, is written into `crosscoder/eval.json` ("quality") and heads the
report, naming the recipe fields to change. It does not stop the study: a degenerate dictionary is still
worth looking at, but no reading of it should pass unannounced.

Bars, in the units of DESIGN.md's definitions (dead = never active over the evaluation window):
- `MAX_DEAD_FRAC` 0.5 of the latents dead. The demo's BatchTopK dictionary has 0.29 (1,024 latents, k 16,
  16k held-out tokens); a 1,000-step run on the demo's store with the library's old defaults (lr 2e-4, a
  dead-latent window of 1M tokens, longer than the run's 384k, so AuxK never saw a dead latent) had 0.94.
- `MAX_FVU` 0.3 in any snapshot. The demo's worst snapshot has 0.20; that collapsed run 0.54 at step 0.
"""

from __future__ import annotations

import sys
import warnings

from crosscoders.train import sparsity_coef

MAX_DEAD_FRAC = 0.5
MAX_FVU = 0.3


class DegenerateDictionary(UserWarning):
    """The crosscoder fails a quality bar (`evolution.crosscoder.quality`)."""


def quality_check(result: dict, tcfg) -> dict:
    """{"degenerate", "bars", "warnings"} for the stage's eval `result` and the TrainConfig it was trained with."""
    cc = tcfg.crosscoder
    out: list[str] = []
    dead = float(result["dead_frac_shared"])
    if dead > MAX_DEAD_FRAC:
        seen = tcfg.steps * tcfg.batch_size
        out.append(f"{dead:.0%} of the {cc.d_sae:,} latents never fire on the {result['n_tokens']:,} held-out tokens "
                   f"(bar {MAX_DEAD_FRAC:.0%}): train longer or faster ([train] steps = {tcfg.steps}, lr = {tcfg.lr_resolved:g}), "
                   f"revive dead latents sooner ([train] dead_tokens = {tcfg.dead_tokens_resolved:,}; the run sees "
                   f"{seen:,} tokens), or use fewer latents ([train.crosscoder] d_sae = {cc.d_sae:,})")
    worst = max(range(len(result["fvu"])), key=lambda i: result["fvu"][i])
    n_bad = sum(f > MAX_FVU for f in result["fvu"])
    if n_bad:
        knob = f"k = {cc.k:g}" if cc.activation == "batchtopk" else f"[train] sparsity_coef = {sparsity_coef(tcfg):g}"
        out.append(f"FVU above {MAX_FVU} in {n_bad} of {len(result['fvu'])} snapshots (worst {result['sources'][worst]}: "
                   f"{result['fvu'][worst]:.2f}): train longer ([train] steps = {tcfg.steps}), raise the budget "
                   f"([train.crosscoder] {knob}, d_sae = {cc.d_sae:,}) or check the activations of that snapshot")
    for w in out:
        print(f"crosscoder: WARNING, degenerate dictionary: {w}", file=sys.stderr, flush=True)
        warnings.warn(w, DegenerateDictionary, stacklevel=2)
    return {"degenerate": bool(out), "bars": {"max_dead_frac": MAX_DEAD_FRAC, "max_fvu": MAX_FVU}, "warnings": out}
