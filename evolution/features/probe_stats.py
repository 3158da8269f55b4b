"""Streaming statistics behind the feature-type scores: how well a token's identity predicts a feature.

`GroupR2` answers "what fraction of the variance of a feature's activation is explained by a grouping
of positions" (here: the current token's identity, or the previous token's) with a **2-fold
cross-fitted R²**: positions are split into two folds (by sequence), the per-group mean activation is
fitted on one fold (shrunk toward the fold's mean by an empirical-Bayes factor, see `group_means`)
and scored on the other, both ways, and

    R² = 1 - (SSE_0 + SSE_1) / (SST_0 + SST_1)

where SSE_f uses the means fitted on the other fold (a group unseen there falls back to that fold's
overall mean) and SST_f is the sum of squares around fold f's own mean. Cross-fitting matters: the
in-sample correlation ratio of a feature over a large vocabulary is inflated by rare tokens (a token
seen once "explains" its own activation perfectly); held out, noise scores about zero.

Everything is kept as per-group sums, so one pass over the stream suffices and memory is
O(n_groups * d_sae) (sums in float32, combined in float64):
SSE_f = Σ_f a² − 2 Σ_v m[v] S_f[v] + Σ_v n_f[v] m[v]².

`LabelMass` accumulates the activation-weighted distribution of the planted corpus's mechanism labels
over the positions where a feature fires.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


class FoldMoments:
    """Per-fold count, sum and sum of squares of each feature's activation (shared by all groupings)."""

    def __init__(self, d_sae: int):
        self.n = torch.zeros(2, dtype=torch.float64)
        self.s1 = torch.zeros(2, d_sae, dtype=torch.float64)
        self.s2 = torch.zeros(2, d_sae, dtype=torch.float64)
        self.active = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, fold: Int[Tensor, " n"], acts: Float[Tensor, "n d_sae"]) -> None:
        a = acts.double()
        for f in (0, 1):
            m = fold == f
            self.n[f] += m.sum()
            self.s1[f] += a[m].sum(0)
            self.s2[f] += (a[m] ** 2).sum(0)
        self.active += (a > 0).sum(0)

    @property
    def sst(self) -> Float[Tensor, "2 d_sae"]:
        return self.s2 - self.s1**2 / self.n.clamp(min=1)[:, None]


class GroupR2:
    """Cross-fitted R² of predicting the activation by the per-group mean (see the module docstring)."""

    def __init__(self, n_groups: int, d_sae: int):
        self.S = torch.zeros(2, n_groups, d_sae, dtype=torch.float32)
        self.count = torch.zeros(2, n_groups, dtype=torch.float64)

    def add(self, fold: Int[Tensor, " n"], group: Int[Tensor, " n"], acts: Float[Tensor, "n d_sae"]) -> None:
        a = acts.float()
        for f in (0, 1):
            m = fold == f
            self.S[f].index_add_(0, group[m], a[m])
            self.count[f].index_add_(0, group[m], torch.ones(int(m.sum()), dtype=torch.float64))

    def r2(self, moments: FoldMoments, chunk: int = 1024) -> Float[Tensor, " d_sae"]:
        """R² per feature; NaN where the feature has no variance on the stream (never fires)."""
        d_sae = self.S.shape[2]
        sse = torch.zeros(d_sae, dtype=torch.float64)
        for lo in range(0, d_sae, chunk):
            hi = min(d_sae, lo + chunk)
            for f in (0, 1):
                g = 1 - f  # fit on fold g, score on fold f
                m = self.group_means(g, moments, lo, hi)
                S_f = self.S[f, :, lo:hi].double()
                sse[lo:hi] += (
                    moments.s2[f, lo:hi] - 2 * (m * S_f).sum(0) + (self.count[f][:, None] * m**2).sum(0)
                )
        sst = moments.sst.sum(0)
        r2 = 1 - sse / sst
        # a constant feature has nothing to explain; relative threshold guards float noise
        dead = sst <= 1e-12 * moments.s2.sum(0).clamp(min=1e-30)
        return torch.where(dead, torch.full_like(r2, float("nan")), r2).float()

    def group_means(self, g: int, moments: FoldMoments, lo: int, hi: int) -> Float[Tensor, "n_groups chunk"]:
        """Shrunken per-group means of fold g for features lo:hi (the random-effects / empirical-Bayes
        estimate, cf. Efron & Morris 1975): m[v] = (S[v] + λ μ) / (n[v] + λ) with λ = σ²_within / σ²_between
        from the one-way ANOVA of the fold. A feature fully determined by the group has σ²_within = 0
        (raw means, R² = 1 even for rare tokens); one unrelated to it has σ²_between ≈ 0 (all means = μ,
        R² ≈ 0) instead of the strongly negative held-out R² of noisy raw means of rare tokens."""
        n_v, N = self.count[g], moments.n[g].clamp(min=1)
        S = self.S[g, :, lo:hi].double()
        s1, s2 = moments.s1[g, lo:hi], moments.s2[g, lo:hi]
        mu = s1 / N
        seen = n_v > 0
        n_groups = seen.sum()
        ss_means = (S**2 / n_v.clamp(min=1)[:, None]).sum(0)  # Σ_v S[v]² / n[v]
        var_w = (s2 - ss_means).clamp(min=0) / (N - n_groups).clamp(min=1)
        ssb = (ss_means - s1**2 / N).clamp(min=0)
        n0 = (N - (n_v**2).sum() / N).clamp(min=1e-9)  # unbalanced-ANOVA effective group size x (G-1)
        var_b = (ssb - (n_groups - 1) * var_w).clamp(min=0) / n0
        lam = torch.where(var_b > 0, var_w / var_b.clamp(min=1e-300), torch.full_like(var_b, float("inf")))
        shrunk = (S + lam * mu) / (n_v[:, None] + lam)
        use = seen[:, None] & torch.isfinite(lam)[None, :]
        return torch.where(use, shrunk, mu[None, :])


class LabelMass:
    """Activation mass per mechanism label: `mass[label, feature] = Σ_t a_t[feature] · 1[label_t = label]`."""

    def __init__(self, n_labels: int, d_sae: int):
        self.mass = torch.zeros(n_labels, d_sae, dtype=torch.float64)

    def add(self, labels: Int[Tensor, " n"], acts: Float[Tensor, "n d_sae"]) -> None:
        keep = labels >= 0  # -1 = BOS / no label
        self.mass.index_add_(0, labels[keep], acts[keep].double().clamp(min=0))

    def type_and_purity(self) -> tuple[Int[Tensor, " d_sae"], Float[Tensor, " d_sae"]]:
        """argmax label per feature (-1 where it never fires on a labelled position) and its share."""
        total = self.mass.sum(0)
        share = self.mass / total.clamp(min=1e-30)
        purity, label = share.max(0)
        fired = total > 0
        return (
            torch.where(fired, label, torch.full_like(label, -1)),
            torch.where(fired, purity, torch.full_like(purity, float("nan"))).float(),
        )


def group_ids(tokens: Int[Tensor, "..."], max_groups: int) -> tuple[Int[Tensor, "..."], int]:
    """Map token ids to compact group ids: the `max_groups - 1` most frequent tokens get their own
    group, all rarer ones share the last (their per-token means would be noise; memory stays bounded)."""
    ids, counts = tokens.unique(return_counts=True)
    if len(ids) <= max_groups:
        keep = ids
    else:
        keep = ids[counts.argsort(descending=True, stable=True)[: max_groups - 1]]
    lut = torch.full((int(tokens.max()) + 1,), len(keep), dtype=torch.long)
    lut[keep] = torch.arange(len(keep))
    n_groups = len(keep) + (1 if len(keep) < len(ids) else 0)
    return lut[tokens], n_groups
