"""Per-snapshot feature types of a crosscoder: the type timeline (when a feature became an induction feature).

Runs every source's snapshot over three token sets (the probe stream, BOS + R + R, and the control
BOS + R + R'), takes each probed snapshot's per-snapshot activations (`evolution.features.snapshot_acts`,
i.e. `crosscoders.model.activations_per_snapshot`) and scores them with `evolution.features.types`.
Writes nothing itself; `analyze` saves `analysis/type_scores.safetensors` and the feature table columns
`type`, `type_onset_step` and `type_score_<type>` (at the last probed snapshot).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from crosscoders.io import save_safetensors
from evolution.features.probes import probe_vocab, random_rows
from evolution.features.snapshot_acts import HANDOUT_ELEMENTS, PreActs, SnapshotActs, encode_token_sets
from evolution.features.types import TYPES, TypeConfig, assign_types, induction_type_stats, stream_type_stats


def repeat_and_control(vocab: Int[Tensor, " v"], seq_len: int, n_seqs: int, bos: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """BOS + R + R and BOS + R + R' (R, R' independent random tokens of `vocab`, distinct within R when possible);
    the first is `probes.induction_tokens` under the same seed."""
    g = torch.Generator().manual_seed(seed)
    R, R2 = random_rows(vocab, seq_len, n_seqs, g), random_rows(vocab, seq_len, n_seqs, g)
    bos_col = torch.full((n_seqs, 1), bos, dtype=torch.long)
    return torch.cat([bos_col, R, R], 1), torch.cat([bos_col, R, R2], 1)


def repeat_len(n_ctx: int, vocab: Tensor, induction_len: int = 32) -> int:
    return max(2, min(induction_len, (n_ctx - 1) // 2, len(vocab)))


def type_token_sets(tokens: Int[Tensor, "n_seq seq_len"], n_ctx: int, bos: int, induction_len: int = 32,
                    induction_seqs: int = 64, seed: int = 0) -> list[Tensor]:
    """What `type_timeline` encodes: `tokens`, and the repeat and control sets."""
    tokens = tokens.long().cpu()
    vocab = probe_vocab(tokens, bos)
    return [tokens, *repeat_and_control(vocab, repeat_len(n_ctx, vocab, induction_len), induction_seqs, bos, seed)]


def type_timeline(
    crosscoder, snapshots: Iterable[tuple[int, object]], tokens: Int[Tensor, "n_seq seq_len"], hook: str,
    steps: Sequence[int], probe_steps: Sequence[int] | None = None, bos_token_id: int | None = None,
    cfg: TypeConfig | None = None, induction_len: int = 32, induction_seqs: int = 64, batch_size: int = 16,
    max_elements: int = HANDOUT_ELEMENTS, autocast: str = "none", pre_acts: PreActs | None = None,
) -> dict:
    """Per probed snapshot: score and z of each type, and the assigned types. `snapshots` must hold every
    source (the pre-activation is shared). Returns {"steps", "score": {type: [d_sae, n]}, "z": {...},
    "types": np.ndarray [d_sae, n] of str}. Latents are scored in column blocks whose activations over every
    probed position hold at most `max_elements` floats (every statistic is per latent, and each block's nulls
    reuse the same seeded shuffles, so the result does not depend on the block size): at Pythia-160M's width
    (24,576 latents, 65,536 probe tokens) all of them at once would be another 6.4 GiB beside the pre-activations.
    `pre_acts`: the snapshots already encoded on (at least) `type_token_sets` (`snapshot_acts.encode_token_sets`);
    then `snapshots` is not read."""
    cfg = cfg or TypeConfig()
    tokens = tokens.long().cpu()
    bos = int(tokens[0, 0]) if bos_token_id is None else bos_token_id
    vocab = probe_vocab(tokens, bos)
    if pre_acts is None:
        pre_acts = encode_token_sets(
            crosscoder, snapshots, lambda n_ctx: type_token_sets(tokens, n_ctx, bos, induction_len, induction_seqs,
                                                                 cfg.seed),
            hook, steps, batch_size, autocast=autocast, n_ctx_default=2 * induction_len + 1)
    L = repeat_len(pre_acts.n_ctx, vocab, induction_len)
    rep, ctrl = repeat_and_control(vocab, L, induction_seqs, bos, cfg.seed)
    pres, all_steps = [pre_acts.of(tokens), pre_acts.of(rep), pre_acts.of(ctrl)], pre_acts.steps
    keep = (torch.arange(tokens.shape[1]) >= 1)[None, :] & (tokens != bos)
    probe_at = list(probe_steps) if probe_steps is not None else all_steps
    score = {t: [] for t in TYPES}
    z = {t: [] for t in TYPES}
    types = []
    d_sae = crosscoder.cfg.d_sae
    width = max(1, min(d_sae, max_elements // max(1, sum(p.shape[0] * p.shape[1] for p in pres))))
    blocks = [slice(c, min(c + width, d_sae)) for c in range(0, d_sae, width)]
    for step in probe_at:
        source = all_steps.index(step)
        parts = []
        for cols in blocks:
            part = crosscoder.latents(cols) if len(blocks) > 1 else crosscoder
            acts = [SnapshotActs(part, p[..., cols], source).rows(0, p.shape[0]) for p in pres]
            s = stream_type_stats(acts[0], tokens, keep, cfg)
            # second copy, its first token left out (it has no predictable continuation from R yet)
            s["induction"] = induction_type_stats(acts[1][:, L + 2:], acts[2][:, L + 2:], cfg)
            parts.append(s)
            del acts
        stats = {t: {k: torch.cat([s[t][k] for s in parts]) for k in parts[0][t]} for t in parts[0]}
        for t in TYPES:
            score[t].append(stats[t]["score"].float())
            z[t].append(stats[t]["z"].float())
        types.append(assign_types(stats, cfg))
    return {"steps": [int(s) for s in probe_at], "score": {t: torch.stack(v, 1) for t, v in score.items()},
            "z": {t: torch.stack(v, 1) for t, v in z.items()}, "types": np.array(types, dtype=object).T}


def save_type_timeline(result: dict, path: str | Path) -> None:
    codes = {t: i for i, t in enumerate(("inactive", "none", *TYPES))}
    tensors = {f"score_{t}": v.contiguous() for t, v in result["score"].items()}
    tensors.update({f"z_{t}": v.contiguous() for t, v in result["z"].items()})
    tensors["type_code"] = torch.tensor(np.vectorize(codes.get)(result["types"]).astype(np.int64))
    tensors["steps"] = torch.tensor(result["steps"], dtype=torch.long)
    save_safetensors(path, tensors, metadata={"type_codes": ",".join(codes)})


def types_for_run(run: Path, crosscoder, steps: list[int], probe_steps: list[int], hook: str | None,
                  max_seqs: int = 256, device: str = "cpu", cfg: TypeConfig | None = None, source=None,
                  autocast: str = "none", pre_acts: PreActs | None = None) -> dict | None:
    """`type_timeline` on a run's held-out corpus (`pre_acts`: the snapshots already encoded, by `run_probes`); writes `analysis/type_scores.safetensors`; returns the
    feature-table columns (`type`, `type_onset_step` — the first probed snapshot of the final run where the
    feature has that type and is present, decoder norm ≥ half its max — and `type_score_<type>` at the last
    probed snapshot),
    or None with the reason printed when the run lacks snapshots, corpus or hook."""
    from evolution.features.types import type_onset
    from evolution.sources.snapshot_source import SnapshotError, SnapshotSource

    source = source if source is not None else SnapshotSource.for_run(run, device=device)
    try:
        source = source.with_steps(steps) if source.with_steps(steps).steps else None
    except SnapshotError as e:
        source = None
        print(f"analyze: type timeline skipped ({e})")
    if source is None or hook is None or not (run / "corpus").is_dir():
        print(f"analyze: type timeline skipped, {run} lacks snapshots, corpus/ or a hook")
        return None
    from evolution.sources.corpus import Corpus

    corpus = Corpus.load(run / "corpus")
    source.check_corpus(corpus)
    tokens = corpus.eval_tokens
    res = type_timeline(crosscoder.to(device), None if pre_acts is not None else source.iter(device=device),
                        tokens[:max_seqs], hook, steps, probe_steps, corpus.bos_token_id, cfg, autocast=autocast,
                        pre_acts=pre_acts)
    save_type_timeline(res, run / "analysis" / "type_scores.safetensors")
    # presence per probed snapshot (decoder norm >= half its max): what dates a type under the shared gate
    norms = crosscoder.decoder_norms().detach().float().cpu()  # [d_sae, n_sources]
    rel = norms / norms.max(1, keepdim=True).values.clamp(min=1e-12)
    present = np.stack([(rel[:, steps.index(s)] >= 0.5).numpy() for s in res["steps"]], 1)
    final, onset = type_onset(res["types"], res["steps"], present)
    cols = {"type": final, "type_onset_step": onset}
    cols.update({f"type_score_{t}": res["score"][t][:, -1].tolist() for t in TYPES})
    return cols
