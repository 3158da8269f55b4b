"""The notebook API: `evolution.load_run(path)` gives one object per run.

    run = load_run("runs/demo")
    run.features.sort_values("peak_step")       # pandas, one row per feature
    run.timelines.rel_norms                     # [d_sae, n_sources] tensor
    run.plot_heatmap(); run.plot_cos_to_final() # matplotlib Figures (shown inline by Jupyter)
    run.feature(12)                             # its row, timeline and top contexts

Everything is read lazily from the run directory: the crosscoder only when asked for, and when
`analysis/` is missing the timelines are computed in memory from the crosscoder (nothing is written;
`feature-evolution analyze RUN` writes them, with the probes' type scores).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor

from evolution.features import plots
from evolution.features.timelines import Timelines


class Run:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no run directory at {self.path}")
        self.analysis_dir = self.path / "analysis"
        if not (self.analysis_dir / "timelines.safetensors").exists() and not (self.path / "crosscoder").is_dir():
            raise FileNotFoundError(f"{self.path} has neither analysis/timelines.safetensors nor crosscoder/: "
                                    "train a crosscoder and run `feature-evolution analyze` first")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}: {self.timelines.d_sae} features, steps {self.steps[0]}..{self.steps[-1]})"

    @property
    def analyzed(self) -> bool:
        return (self.analysis_dir / "timelines.safetensors").exists()

    @cached_property
    def crosscoder(self):
        from crosscoders.model import Crosscoder

        return Crosscoder.load(self.path / "crosscoder")

    @cached_property
    def _analysis(self) -> tuple[Timelines, pd.DataFrame, dict]:
        if self.analyzed:
            from evolution.features.analyze import load_analysis

            return load_analysis(self.path)
        from evolution.features.analyze import source_steps
        from evolution.features.timelines import compute_timelines

        tl = compute_timelines(self.crosscoder, source_steps(self.path, self.crosscoder.cfg.n_sources))
        return tl, tl.to_frame(), tl.summary()

    @property
    def timelines(self) -> Timelines:
        return self._analysis[0]

    @property
    def features(self) -> pd.DataFrame:
        return self._analysis[1]

    @property
    def summary(self) -> dict:
        return self._analysis[2]

    @property
    def steps(self) -> list[int]:
        return self.timelines.steps

    @property
    def turning_point_step(self) -> int | None:
        """The turning point's step where it is used as a phase signal, else None (see `turning_verdict`)."""
        return self.timelines.turning_point_step

    @property
    def turning_verdict(self) -> str:
        """"step 250 (used)" or "step 2750 (not used: <reason>)": the sentence every output shows."""
        return self.timelines.turning_verdict

    @cached_property
    def contexts(self) -> dict:
        p = self.analysis_dir / "contexts.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def hierarchy(self, by: str = "type", **kw) -> pd.DataFrame:
        """When features of each type (`by="type"`) or planted mechanism (`by="mechanism"`) emerge: n, median,
        IQR and bootstrap CI of the emergence step (`at="peak"`: of the peak step), features present from the
        first snapshot counted apart, and the mechanism's learned step (`evolution.features.hierarchy`)."""
        from evolution.features.hierarchy import hierarchy, read_learned_steps

        kw.setdefault("onsets", read_learned_steps(self.path, "learning_onsets"))
        return hierarchy(self.features, self.steps, read_learned_steps(self.path), by=by, **kw)

    def latent_scaling(self) -> dict[str, Tensor]:
        """analysis/latent_scaling.safetensors (Minder et al. 2025): beta_activation, beta_error, norm
        ([d_sae, n_sources], raw units) and flagged (norm says absent, beta says present)."""
        from safetensors.torch import load_file

        p = self.path / "analysis" / "latent_scaling.safetensors"
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: run `feature-evolution analyze {self.path}`")
        out = load_file(str(p))
        out["flagged"] = out["flagged"].bool()
        return out

    @property
    def phases(self) -> dict:
        """phases.json: signals with CIs, the verdict ("boundary" or "inconclusive") and its explanation."""
        p = self.path / "phases.json"
        return json.loads(p.read_text()) if p.exists() else {}

    @property
    def numbers(self) -> dict:
        """numbers.json: helix R², baselines, period strengths and emergence per step and layer ({} if not run)."""
        p = self.path / "numbers.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def numbers_table(self, layer: int | None = None) -> pd.DataFrame:
        """One row per snapshot at `layer` (default: numbers.json's report layer): helix R², baselines, strengths."""
        from evolution.numbers.stage import numbers_table

        if not self.numbers:
            raise FileNotFoundError(f"{self.path}/numbers.json not found: run `feature-evolution numbers {self.path}`")
        return pd.DataFrame(numbers_table(self.numbers, layer))

    def plot_numbers(self) -> Figure:
        from evolution.numbers.plots import numbers_figure

        if not self.numbers:
            raise FileNotFoundError(f"{self.path}/numbers.json not found: run `feature-evolution numbers {self.path}`")
        return numbers_figure(self.numbers)

    def pairwise_cos(self, features: list[int] | Tensor | None = None) -> Tensor:
        """[n_features, n_sources, n_sources] cosines between a feature's decoder directions (needs the crosscoder)."""
        from evolution.features.timelines import pairwise_cos

        W_dec = self.crosscoder.W_dec.detach().float()
        return pairwise_cos(W_dec, features)

    def feature(self, i: int) -> dict[str, Any]:
        """One feature: its table row, rel-norm and cosine timelines, and top contexts per snapshot."""
        if not 0 <= i < self.timelines.d_sae:
            raise IndexError(f"feature {i} out of range 0..{self.timelines.d_sae - 1}")
        return {**self.features.iloc[i].to_dict(),
                "rel_norms": dict(zip(self.steps, self.timelines.rel_norms[i].tolist(), strict=True)),
                "cos_to_final": dict(zip(self.steps, self.timelines.cos_to_final[i].tolist(), strict=True)),
                "contexts": self.contexts.get(str(i), {})}

    def snapshots(self, device: str = "cpu"):
        """The run's snapshot source (pretrain, local: or hf:, from run.json): `.steps`, `.load(step)`,
        `for step, model in run.snapshots(): ...` (one model at a time), `.tokenizer()`, `.check()`."""
        from evolution.sources.snapshot_source import SnapshotSource

        return SnapshotSource.for_run(self.path, device=device)

    @property
    def interventions(self) -> dict:
        """interventions.json: per snapshot and block, Δloss of the linear map / removal with CIs, pruning,
        logit lens (`evolution.interventions.stage`)."""
        p = self.path / "interventions.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def logit_effects(self, i: int, step: int, k: int = 5) -> dict[str, list[tuple[str, float]]]:
        """Tokens feature i's decoder direction at snapshot `step` promotes and suppresses most, through that
        snapshot's final norm and W_U (`evolution.interventions.logit_effects`): {"promoted": [(token,
        logit), ...], "suppressed": [...]}. Read from analysis/logit_effects.json when the interventions
        stage wrote it with ≥ k tokens, else computed from the crosscoder and the snapshot."""
        if not 0 <= i < self.timelines.d_sae:
            raise IndexError(f"feature {i} out of range 0..{self.timelines.d_sae - 1}")
        if step not in self.steps:
            raise ValueError(f"step {step} is not a snapshot of this crosscoder; steps: {self.steps}")
        p = self.analysis_dir / "logit_effects.json"
        stored = json.loads(p.read_text()) if p.exists() else {}
        if stored.get("k", 0) >= k and str(step) in stored.get("features", {}).get(str(i), {}):
            e, vocab = stored["features"][str(i)][str(step)], stored["vocab"]
            return {key: [(vocab[str(t)], v) for t, v in e[key][:k]] for key in ("promoted", "suppressed")}
        from evolution.context import RunContext
        from evolution.interventions.logit_effects import top_logit_effects
        from evolution.recipe import load_run_config

        model = RunContext(load_run_config(self.path)).source.load(step)
        W_dec = self.crosscoder.W_dec[self.steps.index(step), i : i + 1].detach().float()
        e = top_logit_effects(model, W_dec, k)[0]
        return {key: [(model.tokenizer.decode([t]), v) for t, v in e[key]] for key in ("promoted", "suppressed")}

    # figures: thin wrappers so a notebook needs one import
    def plot_heatmap(self, **kw) -> Figure:
        return plots.plot_heatmap(self.timelines, **kw)

    def plot_peak_steps(self, **kw) -> Figure:
        return plots.plot_peak_steps(self.timelines, **kw)

    def plot_timelines_by_group(self, **kw) -> Figure:
        return plots.plot_timelines_by_group(self.timelines, **kw)

    def plot_timelines_by_type(self, **kw) -> Figure | None:
        return plots.plot_timelines_by_type(self.timelines, self.features, **kw)

    def plot_cos_to_final(self, **kw) -> Figure:
        return plots.plot_cos_to_final(self.timelines, **kw)


def load_run(path: str | Path) -> Run:
    return Run(path)


def snapshots(source: str, steps: list[int] | None = None, **kw):
    """A `SnapshotSource` outside any run: `snapshots("local:ckpts", [0, 1000])`, `snapshots("hf:EleutherAI/pythia-70m")`
    (keywords: device, dtype, cache_dir, local_files_only; see evolution.sources.snapshot_source)."""
    from evolution.sources.snapshot_source import SnapshotSource

    return SnapshotSource(source, steps, **kw)
