"""Memory per stage and per training step, before anything runs: what `plan` prints per rank and what the runner
checks against the machine (`check_fits`) before any model loads.

Counting rules (one definition each):
  training step = fp32 parameters + gradients + Adam moments of the rank's block (crosscoders.distributed.
      state_bytes) + the batch (x, x_hat and their gradients) + the tensors the loss saves for backward
      (`saved_tensors`, counted by running the loss) + two code-sized gradients at the backward's peak
      + in stream mode this rank's snapshots (fp32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

GiB = 1 << 30


@dataclass
class Shape:
    n_sources: int
    d_model: int
    n_layers: int
    params: int
    layers_run: int
    seq_len: int
    tokens_per_seq: int
    vocab: int
    n_heads: int


def shape_of(cfg) -> Shape:
    from crosscoders.harvest import stop_layer
    from evolution.sources.snapshot_source import parse_source

    kind, hub = parse_source(cfg.snapshots.source)
    if kind == "hf":
        from evolution.sources.snapshots import GE2025_STEPS
        from evolution.sources.standin import PYTHIA_ARCH

        key = hub.split("/")[-1].removesuffix("-deduped")
        if key not in PYTHIA_ARCH:
            raise ValueError(f"plan: unknown hub model {hub!r}; known: {', '.join(PYTHIA_ARCH)}")
        arch = PYTHIA_ARCH[key]
        params, layers, d, vocab, heads = arch.params, arch.n_layers, arch.d_model, arch.vocab_size, arch.n_heads
        n_sources = len(cfg.snapshots.steps or GE2025_STEPS)
    elif kind == "local":
        from evolution.sources.snapshot_source import SnapshotSource, config_shape

        src = SnapshotSource(cfg.snapshots.source, cfg.snapshots.steps)
        hf = src._config(src.steps[0])
        _, d, layers, vocab = config_shape(hf)
        heads = int(hf.get("num_attention_heads", hf.get("n_head", 1)))
        params = layers * 12 * d * d + 2 * vocab * d  # attention 4 d^2 + MLP 8 d^2 per block, embed + unembed
        n_sources = len(src.steps)
    else:
        from evolution.sources.pretrain import snapshot_schedule

        m = cfg.pretrain.model.resolved(cfg.corpus.seq_len)
        d, layers = m.d_model, m.n_layers
        params = layers * (4 * d * d + 2 * d * m.d_mlp) + 2 * cfg.corpus.vocab_size * d
        n_sources = len(cfg.snapshots.steps or snapshot_schedule(cfg.pretrain))
        vocab, heads = cfg.corpus.vocab_size, m.n_heads
    run = stop_layer(cfg.harvest.hook) or layers
    return Shape(n_sources, d, layers, params, min(run, layers), cfg.corpus.seq_len, cfg.corpus.seq_len - 1, vocab,
                 heads)


@functools.cache
def saved_tensors(activation: str, gate: str, sparsity: str, k: float = 32.0) -> dict[str, int]:
    """What one training step's loss keeps for its backward, counted per kind of tensor: `code` [batch,
    n_sources, d_sae] (the per-source code and what the per-source gate and penalty derive from it), `bh` [batch,
    d_sae] (pre-activations, the shared code, masks), `x` [batch, n_sources, d_in], `w` [n_sources, d_in, d_sae]
    (a copy of a weight, e.g. normalised), `sh` [n_sources, d_sae] and `h` [d_sae] (decoder norms). Counted, not assumed: the
    loss of crosscoders.losses runs once at a small proxy shape whose sizes tell the kinds apart, under
    `torch.autograd.graph.saved_tensors_hooks`, so the count follows the code (tests/evolution/test_plan.py
    checks it at a second shape). Issue 22: per-source JumpReLU with tanh-quad keeps 5 code-sized tensors
    (6 GiB each at [2048, 32, 24576]); the plan used to count 4, including the backward's."""
    import torch

    from crosscoders.config import CrosscoderConfig
    from crosscoders.losses import crosscoder_loss
    from crosscoders.model import Crosscoder

    B, S, d, H = 48, 3, 20, 700  # every product below is distinct, so a storage's size names its kind
    kinds = {4 * B * S * H: "code", 4 * B * H: "bh", 4 * B * S * d: "x", 4 * S * d * H: "w", 4 * S * H: "sh", 4 * H: "h"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = Crosscoder(CrosscoderConfig(n_sources=S, d_in=d, d_sae=H, activation=activation, gate=gate,
                                        k=min(k, 8.0)))
        x = torch.randn(B, S, d)
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        seen: dict[int, int] = {}

        def pack(t):  # a parameter saved for backward costs nothing more
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            crosscoder_loss(m, x, 0.1, sparsity=sparsity, sparse=False)
    out = {"code": 0, "bh": 0, "x": 0, "w": 0, "sh": 0, "h": 0}
    for nbytes in seen.values():
        if nbytes in kinds:
            out[kinds[nbytes]] += 1
    return out


def train_memory(cfg, sh: Shape, cc: dict, D: int, P: int, snapshot_bytes: int = 4,
                 saved_code: int | None = None) -> dict:
    """Bytes one rank holds at the peak of a training step of the dense kernels (what CUDA runs; where the sparse
    ones run, `[train] sparse`, a CPU holds less): the optimiser state of its block, the gradients,
    the batch (fp32 on the device), the tensors the loss saves (`saved_tensors`) and, at the backward's peak,
    two more code-sized gradients (the code's and its gate's); in stream mode its snapshots (fp32 as they run
    today: `snapshot_bytes` per parameter) and its shuffle window."""
    from crosscoders.distributed import state_bytes

    t, h = cfg.train, cfg.harvest
    B, S, d, H = t.batch_size // D, sh.n_sources // P, sh.d_model, t.crosscoder.d_sae
    per_source = t.crosscoder.gate == "per_source"
    code = B * H * (S if per_source else 1)
    n = dict(saved_tensors(t.crosscoder.activation, t.crosscoder.gate, t.sparsity, t.crosscoder.k))
    if saved_code is not None:  # a what-if of `plan --full-study`
        n["code"] = saved_code
    state = state_bytes(cc, P) + 4 * (2 * S * d * H)  # + gradients of W_enc, W_dec
    acts = 4 * (n["code"] * B * S * H + n["bh"] * B * H + (n["x"] + 2) * B * S * d + n["w"] * S * d * H
                + (n["sh"] * S + n["h"]) * H + 2 * code)
    stream = h.mode == "stream"
    models = snapshot_bytes * S * sh.params if stream else 0
    # the shuffle window lives on the snapshots' device (crosscoders/stream.py), fp32 activations
    window = 4 * h.stream_buffer_seqs * sh.tokens_per_seq * S * d * max(1, h.stream_shards // D) if stream else 0
    return {"state": round(state / GiB, 2), "activations": round(acts / GiB, 2), "snapshots": round(models / GiB, 2),
            "stream_window": round(window / GiB, 2), "total_GiB": round((state + acts + models + window) / GiB, 2)}


def forward_bytes(batch: int, seq_len: int, heads: int, d_model: int) -> int:
    """A transformer-lens forward's transient (no grad): the attention scores, their mask, pattern and the
    weighted values of one layer, [batch, heads, seq, seq] each (five copies measured at Pythia-160M's shape:
    1.01 GiB at 4 x 1024), and the block's [batch, seq, 4 d_model] MLP activations."""
    return 4 * batch * seq_len * (5 * heads * seq_len + 3 * 4 * d_model)


def stage_memory(cfg) -> dict[str, int]:
    """Predicted peak bytes each model-running stage holds above an idle process, on its device: what `plan`
    prints, what `check_fits` compares with the device before any model runs, what benchmarks/dryrun.py measures.

    A snapshot in memory is its fp32 weights (4 x params); loading one holds two such copies at once (the
    Hugging Face model and the converted state dict) before the first is dropped."""
    sh = shape_of(cfg)
    t, h, a = cfg.train, cfg.harvest, cfg.analyze
    S, d, H, T = sh.n_sources, sh.d_model, t.crosscoder.d_sae, sh.seq_len
    heads = sh.n_heads
    model, load = 4 * sh.params, 8 * sh.params

    # on a CPU, glibc keeps part of each dropped snapshot's memory in fragments malloc_trim cannot return:
    # measured 0.33-0.5 GiB per Pythia-160M snapshot (0.6 GiB of weights) after the first; CUDA's caching
    # allocator is emptied between snapshots (crosscoders.compute.release_memory)
    retained = 0 if str(h.device).startswith("cuda") else model // 2

    def running(batch: int, rows: int, extra: int = 0, n_loads: int = S) -> int:
        # one snapshot resident, loading, or running a forward on at most `rows` rows, or holding what follows the
        # forward (`extra`: the logits and their statistics; the forward's attention transients are gone by then,
        # measured: adding the two over-predicted evaluation by 10%, interventions by 25%); beside what the
        # allocator kept of the snapshots before it (none when the stage loads only one)
        return (max(load, model + max(forward_bytes(min(batch, rows), T, heads, d), extra))
                + (retained if n_loads > 1 else 0))

    cc = {"n_sources": S, "d_in": d, "d_sae": H, "activation": t.crosscoder.activation}
    crosscoder_w = 4 * 2 * S * d * H  # W_enc, W_dec in fp32
    # analyze: the probes' shared pre-activations (features.snapshot_acts.check_memory's count) beside the
    # crosscoder and one snapshot (evolution.features.probes: probe rows and the 64 x 65 induction tokens)
    n_eval = cfg.corpus.n_eval_seqs
    probe_rows = min(a.probe_max_seqs, n_eval)
    # one encoding for the probes and the type probe (features.snapshot_acts.encode_token_sets): the held-out rows,
    # BOS + R + R (64 x 65: the probes' induction set and the type probe's repeat set) and the control BOS + R + R'
    probe_tokens = probe_rows * T + 2 * 64 * 65
    # the pre-activations and one handed-out block; two GroupR2 sums [2 folds, groups, d_sae] (current and
    # previous token, evolution.features.probe_stats) over at most max_groups = 4096 token groups
    groups = min(4096, probe_rows * T)
    probes = 4 * (H * probe_tokens + min(2**26, H * probe_tokens) + 2 * 2 * groups * H)
    # Latent Scaling: ~6 code-sized float32 tensors of latent_scaling_rows rows (evolution.features.scaling)
    from evolution.features.scaling import latent_scaling_rows

    scaling = 4 * 6 * latent_scaling_rows(S, H) * S * H
    ev = cfg.evaluate
    ev_rows = min(ev.batch_size, ev.n_seqs or n_eval)
    iv_rows = min(cfg.interventions.eval_batch_size, cfg.interventions.n_eval_seqs, n_eval)
    logits = lambda rows: 4 * rows * T * sh.vocab  # noqa: E731  ([rows, seq, vocab] fp32)
    stat_bytes = 4 if str(cfg.harvest.device).startswith("cuda") else 8
    out = {
        "harvest": running(h.batch_size, h.n_seqs),
        "crosscoder": int(train_memory(cfg, sh, cc, 1, 1)["total_GiB"] * GiB),
        # the crosscoder beside the largest of: the timelines (unit decoder directions and their products with the
        # final snapshot's: a W_dec-sized transient), the probes with one snapshot, Latent Scaling
        "analyze": crosscoder_w + max(crosscoder_w, probes + running(16, probe_rows), scaling),
        # every layer's residual at the sampled positions (fp64 for the metrics)
        "geometry": running(cfg.geometry.batch_size, n_eval, 8 * cfg.geometry.n_tokens * (sh.n_layers + 1) * d,
                            len(cfg.geometry.steps or range(S))),
        # the logits (fp32) and three tensors of their shape in the statistics' dtype alive at once (evolution.
        # evaluate: log-softmax, its exp and their product; the cast feeding log_softmax is dropped before the
        # product exists; fp64 on a CPU, fp32 on a GPU). Measured at the dry run's shape: 3 of them, not 4
        "evaluate": running(ev_rows, ev_rows, logits(ev_rows) * (1 + 3 * stat_bytes // 4)),
    }
    if cfg.interventions.enabled:
        # the logits (fp32) beside their cast and its log-softmax (evolution.interventions.linear_replacement.
        # batch_nll; the logit lens does one layer at a time, the same), and the crosscoder's W_dec kept for the
        # logit effects (ranked in 256 MiB chunks of rows: evolution.interventions.logit_effects)
        w_dec = crosscoder_w // 2 if cfg.interventions.logit_effects else 0
        out["interventions"] = running(iv_rows, iv_rows, logits(iv_rows) * (1 + 2 * stat_bytes // 4),
                                       len(cfg.interventions.steps or range(S))) + w_dec
    return out


STAGE_DEVICE = {"harvest": lambda c: c.harvest.device, "crosscoder": lambda c: c.train.device,
                "analyze": lambda c: c.analyze.device, "geometry": lambda c: c.geometry.device,
                "evaluate": lambda c: c.harvest.device, "interventions": lambda c: c.harvest.device}
"""The device each model-running stage computes on (evaluate and interventions follow the harvest's)."""
KNOBS = {"harvest": "[harvest] batch_size", "crosscoder": "[train] batch_size or [train.crosscoder] d_sae, or more "
         "GPUs ([parallel] nproc_per_node, source_parallel)", "analyze": "[analyze] probe_max_seqs",
         "geometry": "[geometry] n_tokens or batch_size", "evaluate": "[evaluate] batch_size",
         "interventions": "[interventions] eval_batch_size"}
"""What to lower when a stage does not fit."""


def device_bytes(device: str) -> int:
    """Memory a stage may use on `device`: the GPU's total, or the host's available memory (MemAvailable)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev.index or 0).total_memory
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(cfg, stages: list[str], fraction: float = 0.9,
               available: Callable[[str], int] = device_bytes) -> dict[str, int]:
    """Refuse a recipe whose stages cannot fit their device, before any model runs: every device named must exist,
    and each stage's `stage_memory` must be within `fraction` of the device's memory, else a UserError with the
    figure and the knob to turn. Returns the predictions."""
    from crosscoders.errors import UserError
    from crosscoders.mesh import check_device

    for name in stages:
        if name in STAGE_DEVICE:
            try:
                check_device(STAGE_DEVICE[name](cfg))
            except UserError as e:
                raise UserError(f"the {name} stage's device: {e}") from None
    need = stage_memory(cfg)
    for name in stages:
        if name not in need:
            continue
        dev = STAGE_DEVICE[name](cfg)
        have = available(dev)
        if need[name] > fraction * have:
            raise UserError(f"the {name} stage needs about {need[name] / GiB:.1f} GiB on {dev} (evolution.memory."
                            f"stage_memory), more than {fraction:.0%} of the {have / GiB:.1f} GiB there: lower "
                            f"{KNOBS[name]}")
    return need
