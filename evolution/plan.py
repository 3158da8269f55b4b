"""`feature-evolution plan RECIPE.toml [--gpus 1,8] [--gpu H100]`: what a recipe costs, before running anything.

For each GPU count: snapshots to download, forward passes, activation-store disk (store vs stream mode),
crosscoder FLOPs, memory per rank, and the expected hours on a named GPU. Nothing is downloaded or run:
the snapshot shapes come from the recipe ([pretrain.model]) or, for Pythia on the hub, from Biderman et
al. 2023 (Table 1). The hours rest on ASSUMED rates (`ASSUMPTIONS`, printed with the plan): no GPU
benchmark of this code base has been recorded yet (benchmarks/README.md); rerun `python -m benchmarks.run`
and `python -m benchmarks.stream_bench` on the GPU and replace them with the measured figures.

Counting rules (one definition each):
  forward FLOPs / token = 2 x 12 d_model^2 x layers run + 2 x layers run x seq_len x d_model   (Kaplan et al.
      2020, eq. 2.2, non-embedding; the forward stops after the hook's layer)
  crosscoder FLOPs / step = 12 B n_sources d_in d_sae   (encoder + decoder, forward + backward; the dense
      path every gate uses; benchmarks/train_bench.py counts the same)
  memory per rank = fp32 parameters + gradients + Adam moments of the rank's block (crosscoders.distributed.
      state_bytes) + the batch's activations (x, x_hat, pre, code and their gradients, the code per source
      with the per-source gate) + in stream mode this rank's snapshots (fp32) on the GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from evolution.memory import Shape, shape_of, train_memory

# GPU: (dense bf16 TFLOP/s, GiB of memory, memory TB/s), from the vendors' data sheets (SXM parts).
GPUS = {"H100": (989.0, 80, 3.35), "H200": (989.0, 141, 4.8), "A100": (312.0, 80, 2.0), "L40S": (362.0, 48, 0.86)}
ASSUMPTIONS = {
    "crosscoder_mfu": 0.35,
    "forward_mfu": 0.15,
    "disk_write_GBps": 2.0,
    "disk_read_GBps": 3.0,
    "interconnect_GBps": 200.0,
    "hub_download_MBps": 100.0,
    "checkpoint_bytes_per_param": 2,
    "code_passes_per_step": 24,
    "crosscoder_flop_fraction": 1.0,
}
"""Assumed, not measured here: fraction of the bf16 dense peak reached by the crosscoder's GEMMs and by the
snapshots' forwards (small models run far below peak), local NVMe and NVLink bandwidths, hub download rate,
fp16 checkpoints on the hub, the elementwise passes over the fp32 code [batch, (n_sources,) d_sae] per
training step (gate, penalty, their gradients; memory-bound, at the GPU's memory bandwidth), and the fraction of
the dense crosscoder FLOPs the kernels run (1: every gate's training step is dense today but BatchTopK's)."""


def plan(cfg, n_gpus: int, gpu: str = "H100", source_parallel: int | None = None, rates: dict | None = None,
         memory: dict | None = None) -> dict:
    """The plan's figures for `n_gpus` ranks; the layout is the fastest (data x source) split that fits in 90% of
    the GPU's memory, or `source_parallel` source ranks where given. `rates` replace ASSUMPTIONS entries and
    `memory` train_memory's what-if arguments (`full_study`)."""
    from crosscoders.distributed import state_bytes

    if gpu not in GPUS:
        raise ValueError(f"plan: unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    sh, h, t = shape_of(cfg), cfg.harvest, cfg.train
    cc = {"n_sources": sh.n_sources, "d_in": sh.d_model, "d_sae": t.crosscoder.d_sae, "activation": t.crosscoder.activation}
    gib = GPUS[gpu][1]
    a = {**ASSUMPTIONS, **(rates or {})}
    fwd_per_tok = 2 * 12 * sh.d_model ** 2 * sh.layers_run + 2 * sh.layers_run * sh.seq_len * sh.d_model
    stored = h.n_seqs * sh.tokens_per_seq
    seen = t.steps * t.batch_size
    bytes_el = {"bfloat16": 2, "float16": 2, "float32": 4}[h.dtype]
    cc_flops = 12 * t.batch_size * sh.n_sources * sh.d_model * t.crosscoder.d_sae * t.steps
    out = {"recipe": cfg.name, "mode": h.mode, "gpus": n_gpus, "gpu": gpu, "n_sources": sh.n_sources,
           "snapshot": {"params": sh.params, "d_model": sh.d_model, "layers_run": sh.layers_run},
           "download_GB": round(sh.n_sources * sh.params * a["checkpoint_bytes_per_param"] / 1e9, 2)
           if cfg.snapshots.source.startswith("hf:") else 0.0,
           "tokens_stored": stored if h.mode == "store" else 0, "tokens_seen": seen, "epochs": round(seen / stored, 2)}
    # forward passes: store mode runs every snapshot over the stored (and held-out) tokens once; stream mode
    # over every token training reads (each epoch again) and over the held-out tokens
    eval_tok = h.n_eval_seqs * sh.tokens_per_seq
    fwd_tokens = sh.n_sources * ((stored if h.mode == "store" else seen) + eval_tok)
    out["forward_token_passes"] = fwd_tokens
    out["forward_PFLOP"] = round(fwd_tokens * fwd_per_tok / 1e15, 2)
    store_gb = (stored + eval_tok) * sh.n_sources * sh.d_model * bytes_el / 1e9
    out["activation_disk_GB"] = {"store": round(store_gb, 1), "stream": 0.0, "this_recipe": round(
        store_gb if h.mode == "store" else 0.0, 1)}
    out["crosscoder_PFLOP"] = round(cc_flops / 1e15, 1)
    out["crosscoder_FLOP"] = cc_flops
    # layout: of the splits that fit in memory, the fastest (source ranks cut the model and the per-source code,
    # data ranks the batch; each adds its collectives)
    cands = [p for p in range(1, n_gpus + 1) if n_gpus % p == 0 and sh.n_sources % p == 0
             and (not source_parallel or p == source_parallel)]
    if not cands:
        raise ValueError(f"plan: source_parallel={source_parallel} must divide {n_gpus} GPUs and {sh.n_sources} sources")
    rows = [(P, train_memory(cfg, sh, cc, n_gpus // P, P, **(memory or {})),
             _hours(cfg, sh, cc, n_gpus, P, out, fwd_per_tok, gpu, a)) for P in cands]
    fits = [r for r in rows if r[1]["total_GiB"] <= 0.9 * gib]
    P, mem, hours = min(fits, key=lambda r: r[2]["total"]) if fits else min(rows, key=lambda r: r[1]["total_GiB"])
    out["layout"] = {"data": n_gpus // P, "source": P, "fits": bool(fits)}
    out["memory_per_rank_GiB"] = mem
    out["state_bytes_per_rank"] = state_bytes(cc, P)
    out["hours"] = hours
    return out


def _hours(cfg, sh: Shape, cc: dict, n_gpus: int, P: int, out: dict, fwd_per_tok: float, gpu: str, a: dict) -> dict:
    """Hours per part: the crosscoder and the forwards divide over the ranks (the store-mode harvest over at most
    n_sources of them, one snapshot each); collectives per step: the pre-activation all-reduce in each source group (forward and
    backward) and the gradient all-reduce in each data group (ring: twice the gradient's bytes)."""
    from crosscoders.distributed import state_bytes

    t, h = cfg.train, cfg.harvest
    tflops, _, tbps = GPUS[gpu]
    peak, D = tflops * 1e12, n_gpus // P
    B = t.batch_size // D
    t_cc = out["crosscoder_FLOP"] * a["crosscoder_flop_fraction"] / (peak * a["crosscoder_mfu"] * n_gpus)
    code = B * t.crosscoder.d_sae * (sh.n_sources // P if t.crosscoder.gate == "per_source" else 1)
    t_code = t.steps * a["code_passes_per_step"] * 4 * code / (tbps * 1e12)
    # stream: every rank runs its snapshots on its tokens; store: the harvest splits the snapshots over the ranks
    t_fwd = out["forward_token_passes"] * fwd_per_tok / (peak * a["forward_mfu"] * (
        n_gpus if h.mode == "stream" else min(n_gpus, sh.n_sources)))
    comm = t.steps * ((2 * 2 * 4 * B * t.crosscoder.d_sae if P > 1 else 0) +
                      (2 * state_bytes(cc, P) / 3 if D > 1 else 0)) / (a["interconnect_GBps"] * 1e9)
    bytes_el = {"bfloat16": 2, "float16": 2, "float32": 4}[h.dtype]
    # each rank reads only its rows and snapshots of every global batch (crosscoders.store: batches(rows=,
    # sources=)), so the disk serves the global batches' bytes once
    t_disk = (out["activation_disk_GB"]["store"] / a["disk_write_GBps"] + out["tokens_seen"] * sh.n_sources *
              sh.d_model * bytes_el / 1e9 / a["disk_read_GBps"]) if h.mode == "store" else 0.0
    if h.mode == "store" and n_gpus > 1:  # the distributed harvest writes one-source parts, then reads and merges them
        t_disk += out["activation_disk_GB"]["store"] * (1 / a["disk_write_GBps"] + 1 / a["disk_read_GBps"])
    t_dl = out["download_GB"] * 1e3 / a["hub_download_MBps"]
    parts = {"download": t_dl, "forwards": t_fwd, "store_io": t_disk, "crosscoder_matmuls": t_cc,
             "crosscoder_elementwise": t_code, "collectives": comm}
    hours = {k: round(v / 3600, 3) for k, v in parts.items()}
    hours["total"] = round(sum(parts.values()) / 3600, 2)
    return hours


GE2025_TOKENS = 800_000_000
"""Ge et al. 2025's crosscoder training tokens (OpenMOSS train_pythia_crosscoder.py: total_training_tokens)."""
FULL_STUDY_STEPS = [
    ("today's code", {}, {}),
    ("+ sparse JumpReLU kernels (issue 23 item 3): the encoder forward stays dense, the decoder and the weight "
     "gradients run through the active entries, ~1/6 of the dense FLOPs", {"crosscoder_flop_fraction": 1 / 6}, {}),
    ("+ one fused pass over the per-source code per direction instead of ~24 (gate, tanh-quad penalty and their "
     "gradients in one kernel, as _JumpReLU recomputes the gate)", {"code_passes_per_step": 4}, {"saved_code": 1}),
    ("+ snapshots in bf16 (fp32 today: SnapshotSource.dtype) with fused attention (SDPA) in the forwards, at MFU 0.4 "
     "instead of transformer-lens's eager attention at 0.15", {"forward_mfu": 0.4}, {"snapshot_bytes": 2}),
]
"""What stands between today's code and Ge et al.'s full study on one GPU in 6 hours, one change at a time; each row
keeps the ones above it. The rates are the plan's assumptions (no GPU has measured this code yet)."""


def full_study(cfg, gpu: str = "H100", n_gpus: int = 1) -> list[dict]:
    """Ge et al.'s full study, 32 snapshots x 800M tokens in stream mode (zero activation disk), planned on `n_gpus`
    x `gpu` after each change of FULL_STUDY_STEPS in turn."""
    t = cfg.train
    steps = GE2025_TOKENS // t.batch_size
    h = dataclasses.replace(cfg.harvest, mode="stream", n_seqs=-(-GE2025_TOKENS // (cfg.corpus.seq_len - 1)))
    full = dataclasses.replace(cfg, harvest=h, train=dataclasses.replace(t, steps=steps))
    rows, rates, memory = [], {}, {}
    for name, r, m in FULL_STUDY_STEPS:
        rates, memory = {**rates, **r}, {**memory, **m}
        p = plan(full, n_gpus, gpu, rates=rates, memory=memory)
        rows.append({"change": name, "hours": p["hours"], "memory_GiB": p["memory_per_rank_GiB"]["total_GiB"],
                     "fits": p["layout"]["fits"], "layout": p["layout"], "tokens_seen": p["tokens_seen"]})
    return rows


def format_full_study(rows: list[dict], gpu: str, n_gpus: int) -> str:
    lines = [f"Ge et al.'s full study (32 snapshots, {rows[0]['tokens_seen']:,} tokens, stream mode, no activation "
             f"disk) on {n_gpus} x {gpu}:"]
    for r in rows:
        h = r["hours"]
        lines.append(f"  {h['total']:>6.1f} h  {r['memory_GiB']:>6.1f} GiB{'' if r['fits'] else ' (DOES NOT FIT)'}  "
                     f"[forwards {h['forwards']:.1f}, matmuls {h['crosscoder_matmuls']:.1f}, elementwise "
                     f"{h['crosscoder_elementwise']:.1f}, collectives {h['collectives']:.1f}]  {r['change']}")
    return "\n".join(lines)


def format_plan(p: dict) -> str:
    m, hrs = p["memory_per_rank_GiB"], p["hours"]
    lines = [f"{p['recipe']} ({p['mode']} mode) on {p['gpus']} x {p['gpu']}: data {p['layout']['data']} x source "
             f"{p['layout']['source']}{'' if p['layout']['fits'] else '  (DOES NOT FIT: more GPUs or a smaller batch)'}",
             f"  snapshots: {p['n_sources']} x {p['snapshot']['params'] / 1e6:.0f}M params, download "
             f"{p['download_GB']:.1f} GB",
             f"  forward passes: {p['forward_token_passes']:.3g} token-passes = {p['forward_PFLOP']} PFLOP",
             f"  activation disk: store {p['activation_disk_GB']['store']} GB, stream 0 GB; this recipe "
             f"{p['activation_disk_GB']['this_recipe']} GB",
             f"  crosscoder: {p['tokens_seen']:,} tokens seen ({p['epochs']} epochs), {p['crosscoder_PFLOP']} PFLOP",
             f"  memory per rank: {m['total_GiB']} GiB (state {m['state']}, batch activations {m['activations']}, "
             f"snapshots {m['snapshots']}, stream window {m['stream_window']})",
             "  hours: " + ", ".join(f"{k} {v}" for k, v in hrs.items())]
    return "\n".join(lines)


def plan_cli(argv: list[str] | None = None) -> list[dict]:
    """`feature-evolution plan RECIPE.toml [--gpus 1,8] [--gpu H100] [--json]`."""
    from evolution.recipe import load_recipe

    ap = argparse.ArgumentParser(prog="feature-evolution plan", description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--gpus", default="1,8", help="comma-separated GPU counts to plan for")
    ap.add_argument("--gpu", default="H100", help=f"GPU model: {', '.join(GPUS)}")
    ap.add_argument("--source-parallel", type=int, default=None, help="force this many source ranks")
    ap.add_argument("--steps", type=int, default=None, help="plan for this many crosscoder steps instead of the recipe's")
    ap.add_argument("--n-seqs", type=int, default=None, help="plan for this many training sequences ([harvest] n_seqs)")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    ap.add_argument("--full-study", action="store_true",
                    help="also plan Ge et al.'s full study (32 snapshots x 800M tokens, stream mode) after each change "
                         "that stands between today's code and it")
    ns = ap.parse_args(argv)
    cfg = load_recipe(ns.recipe)
    if ns.steps:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=ns.steps))
    if ns.n_seqs:
        cfg = dataclasses.replace(cfg, harvest=dataclasses.replace(cfg.harvest, n_seqs=ns.n_seqs))
    plans = [plan(cfg, int(n), ns.gpu, ns.source_parallel) for n in ns.gpus.split(",")]
    for p in plans:
        print(json.dumps(p) if ns.json else format_plan(p))
    if ns.full_study:
        for n in ns.gpus.split(","):
            rows = full_study(cfg, ns.gpu, int(n))
            print(json.dumps({"full_study": rows, "gpus": int(n), "gpu": ns.gpu}) if ns.json
                  else format_full_study(rows, ns.gpu, int(n)))
    if not ns.json:
        print("assumed rates (not measured; see evolution/plan.py): " + json.dumps(ASSUMPTIONS), file=sys.stdout)
    return plans


if __name__ == "__main__":
    plan_cli()
