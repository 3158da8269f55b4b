"""Per-snapshot feature activations of a crosscoder on token streams, one snapshot model at a time.

The crosscoder's pre-activation `sum_s W_enc[s] x_s + b_enc` is shared by all sources, so a feature's
activation in snapshot s (`crosscoders.model.activations_per_snapshot`: the per-source code, or
f_i |W_dec[s, i]| with the shared gate) needs every snapshot's activations on the same tokens.
`shared_pre_acts` runs each source's model once and accumulates the sum (memory: n_tokens x d_sae
floats per token set, checked against a stated budget first); `SnapshotActs` then hands out one source's
activations by rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor

from crosscoders.compute import release_memory
from crosscoders.errors import UserError
from crosscoders.harvest import stop_layer
from crosscoders.precision import autocast_context, resolve_autocast
from crosscoders.progress import progress_bar

MAX_PRE_ACT_BYTES = 8 * 2**30
"""Budget of `shared_pre_acts`: the pre-activations it holds (n_tokens x d_sae float32 over all token sets)."""
HANDOUT_ELEMENTS = 2**26
"""Most activation values handed out at once beside the pre-activations: the type probe scores latents in
column blocks of this many values over its positions (`type_probe.type_timeline(max_elements=)`)."""


def check_memory(token_sets: Sequence[Tensor], d_sae: int, max_bytes: int | None = None) -> int:
    """Bytes the probes will hold: the pre-activations (n_tokens x d_sae float32) and one block of activations
    handed out (the largest set, at most `HANDOUT_ELEMENTS` values); raise a UserError naming the knobs when
    above `max_bytes`. Pythia-160M's shape (24,576 latents, 65,536 + 4,160 probe tokens): 6.6 GiB."""
    budget = MAX_PRE_ACT_BYTES if max_bytes is None else max_bytes
    n_tokens = sum(t.numel() for t in token_sets)
    handout = min(HANDOUT_ELEMENTS, d_sae * max((t.numel() for t in token_sets), default=0))
    need = 4 * (d_sae * n_tokens + handout)
    if need > budget:
        raise UserError(
            f"per-snapshot probe activations would hold {n_tokens:,} tokens x d_sae {d_sae:,} float32 "
            f"= {need / 2**30:.1f} GiB, above the budget of {budget / 2**30:.1f} GiB: probe fewer tokens "
            "(analyze's probe sequences / induction sequences) or raise the budget "
            "(evolution.features.snapshot_acts.MAX_PRE_ACT_BYTES, or max_bytes=)")
    return need


@torch.no_grad()
def _hook_acts(model, hook: str, tokens: Tensor, autocast: str = "none") -> Tensor:
    """`hook`'s activations on `tokens`, the forward in the precision the harvest recorded (`autocast`), so that the
    probes read the activations the crosscoder was trained on."""
    dev = torch.device(model.cfg.device)
    with autocast_context(resolve_autocast(autocast, dev), dev):
        _, cache = model.run_with_cache(tokens.to(dev), names_filter=hook, stop_at_layer=stop_layer(hook))
    return cache[hook]


@torch.no_grad()
def shared_pre_acts(
    crosscoder, snapshots: Iterable[tuple[int, object]], token_sets: Sequence[Tensor], hook: str,
    steps: Sequence[int] | None = None, batch_size: int = 16, max_bytes: int | None = None, autocast: str = "none",
) -> tuple[list[Tensor], object, list[int]]:
    """`sum_s W_enc[s] x_s + b_enc` on each token set `[n_seq, seq_len]`, running each source's snapshot once
    (one model held at a time). `snapshots` must cover every source (`steps`: the sources' steps in order;
    without it the snapshots are the sources in order). Returns the pre-activations `[n_seq, seq_len, d_sae]`
    (float32, CPU), the first snapshot's tokenizer (or None) and each source's step. Refuses (`check_memory`)
    before running any model when that would exceed `max_bytes` (default `MAX_PRE_ACT_BYTES`). `autocast`: the
    snapshots' forward precision, the harvest's (`harvest_autocast`)."""
    n_sources, _, d_sae = crosscoder.W_enc.shape
    check_memory(token_sets, d_sae, max_bytes)
    W_enc, dtype = crosscoder.W_enc.detach(), crosscoder.W_enc.dtype
    pres = [crosscoder.b_enc.detach().float().cpu().expand(*t.shape, d_sae).clone() for t in token_sets]
    seen: dict[int, int] = {}
    tokenizer = None
    # a bar updated by hand and a counter, not tqdm(snapshots) or enumerate(snapshots): both keep the previous
    # item, the previous model, alive while the next one loads
    bar = progress_bar(desc="encoding snapshots", unit="snapshot")
    i = -1
    for step, model in snapshots:
        i += 1
        source = list(steps).index(step) if steps is not None and step in steps else i
        if source >= n_sources or (steps is not None and step not in steps):
            raise ValueError(f"snapshot step {step} is not one of the crosscoder's {n_sources} sources "
                             f"(steps {list(steps) if steps is not None else list(range(n_sources))})")
        for pre, toks in zip(pres, token_sets, strict=True):
            for lo in range(0, toks.shape[0], batch_size):
                x = _hook_acts(model, hook, toks[lo : lo + batch_size], autocast).to(W_enc.device, dtype)
                pre[lo : lo + batch_size] += einsum(x, W_enc[source], "b p d, d h -> b p h").float().cpu()
        seen[source] = int(step)
        tokenizer = tokenizer or getattr(model, "tokenizer", None)
        del model  # before the next snapshot loads: one model in memory at a time
        release_memory(W_enc.device)
        bar.update(1)
    bar.close()
    missing = sorted(set(range(n_sources)) - set(seen))
    if missing:
        names = [steps[m] for m in missing] if steps is not None else missing
        raise ValueError(f"per-snapshot activations need every source's snapshot (the pre-activation is shared "
                         f"by all sources); missing steps {names}")
    return pres, tokenizer, [seen[s] for s in range(n_sources)]


@dataclass
class PreActs:
    """Pre-activations of several token sets from one pass over the snapshots (`encode_token_sets`), found by
    their tokens. The analyze stage encodes once for the probes and the type probe: their sets overlap (the
    held-out rows; BOS + R + R is the probes' induction set and the type probe's repeat set), and each pass
    loads and runs every snapshot (at Pythia-160M's shape on a CPU: ~2 min)."""

    token_sets: list[Tensor]
    pres: list[Float[Tensor, "n_seq seq_len d_sae"]]
    tokenizer: object
    steps: list[int]
    """each source's step"""
    n_ctx: int
    """the snapshots' context length"""

    def of(self, tokens: Tensor) -> Tensor:
        for t, p in zip(self.token_sets, self.pres, strict=True):
            if t.shape == tokens.shape and torch.equal(t, tokens.to(t.device, t.dtype)):
                return p
        raise KeyError(f"no token set of shape {tuple(tokens.shape)} was encoded in this pass")


def encode_token_sets(crosscoder, snapshots: Iterable[tuple[int, object]], make_sets: Callable[[int], list[Tensor]],
                      hook: str, steps: Sequence[int] | None = None, batch_size: int = 16,
                      max_bytes: int | None = None, autocast: str = "none", n_ctx_default: int | None = None) -> PreActs:
    """`shared_pre_acts` of the distinct token sets `make_sets(n_ctx)` returns, n_ctx read off the first snapshot
    (`n_ctx_default` for a model without `cfg.n_ctx`); one model held at a time."""
    snapshots = iter(snapshots)  # consumed once, lazily
    first = next(snapshots, None)
    if first is None:
        raise ValueError("no snapshots to encode")
    n_ctx = getattr(getattr(first[1], "cfg", None), "n_ctx", n_ctx_default)
    if n_ctx is None:
        raise ValueError(f"cannot read the context length of snapshot {first[0]} (no cfg.n_ctx)")
    snapshots = put_back([first], snapshots)
    del first  # this frame must not keep the first model through the others' loads
    sets: list[Tensor] = []
    for t in make_sets(int(n_ctx)):
        t = t.long().cpu()
        if not any(u.shape == t.shape and torch.equal(u, t) for u in sets):
            sets.append(t)
    pres, tokenizer, all_steps = shared_pre_acts(crosscoder, snapshots, sets, hook, steps, batch_size, max_bytes,
                                                 autocast)
    return PreActs(sets, pres, tokenizer, all_steps, int(n_ctx))


def put_back(box: list, rest: Iterable) -> Iterator:
    """The item in `box` (taken out of it), then `rest`: `itertools.chain([first], rest)` keeps `first` (a model)
    alive until the chain ends, through every later snapshot's load. The caller drops its own reference."""
    yield box.pop()
    yield from rest


def harvest_autocast(manifest: dict) -> str:
    """The forward precision a store's activations were computed in (`metadata.forward.precision`, recorded by
    the harvest), as an autocast setting for the probes' forwards: "bf16" or "none" (fp32; older stores)."""
    forward = (manifest.get("metadata") or {}).get("forward") or {}
    return "bf16" if forward.get("precision") == "bf16" else "none"


class SnapshotActs:
    """Activations in source `source` of precomputed pre-activations `pre[n_seq, seq_len, d_sae]`, handed out
    by rows (what `_batched` asks for), computed in chunks of at most `max_elements` values."""

    def __init__(self, crosscoder, pre: Tensor, source: int, max_elements: int = 2**24):
        self.crosscoder, self.pre, self.source = crosscoder, pre, source
        self.max_elements = max_elements

    def rows(self, lo: int, hi: int) -> Float[Tensor, "batch pos d_sae"]:
        p = self.pre[lo:hi]
        b, n, h = p.shape
        flat = p.reshape(b * n, h)
        S = self.crosscoder.W_enc.shape[0]
        step = max(1, self.max_elements // (S * h))
        dev, dt = self.crosscoder.W_enc.device, self.crosscoder.W_enc.dtype
        # a copy: the slice is a view that would keep every chunk's whole [rows, n_sources, d_sae] code alive
        # until the cat (at Pythia-160M's width, 12 chunks of 67 MB for one 1,024-token row)
        out = [self.crosscoder.activations_from_pre(flat[i : i + step].to(dev, dt))[:, self.source]
               .to("cpu", torch.float32, copy=True) for i in range(0, b * n, step)]
        return torch.cat(out).reshape(b, n, h)


def crosscoder_acts_fn(crosscoder, models: Sequence, hook: str, source: int, max_elements: int = 2**24):
    """Feature activations in snapshot `source`: run every source's model (`models`, in source order) to
    `hook`, sum the encoders, and take `activations_per_snapshot(...)[:, source]` (crosscoders.model)."""

    def fn(tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_sae"]:
        (pre,), _, _ = shared_pre_acts(crosscoder, list(enumerate(models)), [tokens], hook, batch_size=len(tokens))
        return SnapshotActs(crosscoder, pre, source, max_elements).rows(0, len(tokens))

    return fn
