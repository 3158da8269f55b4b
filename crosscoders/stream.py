"""Zero-disk training data: the snapshots' activations computed as training consumes them.

    s = ShuffleStream(models, tokens, "blocks.6.hook_resid_post", batch_size=2048, buffer_seqs=256, scales=sc)
    train(cfg, s, out_dir, norm_scale=sc)           # s(start_step) -> batches [batch, n_sources, d_in]

The token stream is cut, per epoch, into a seeded permutation of its sequences; consecutive *windows* of
`buffer_seqs` sequences per data rank run through every snapshot this rank holds, and the window's tokens
(from all its sequences and forward batches) go into a shuffle buffer from which batches are drawn without
replacement (a seeded permutation of the buffer). The buffer holds buffer_seqs x (seq_len - 1) tokens; a
window's remainder smaller than a batch is dropped (< 1 batch per window), and so are the last
n_seq mod (D buffer_seqs) sequences of each epoch's permutation.

Position and RNG are functions of the step: window w of epoch e, permuted by a generator seeded from
(seed, e, w, data rank), holds steps [start_w, start_w + n_w), with n_w computed from the token mask alone
(no forward pass). So `s(n)` resumes at step n after recomputing one window, and the checkpoint records
`position(n)` (epoch, window, batch in window, sequences consumed, window seed), which `check_position`
compares on resume: a killed run resumes to the weights of an uninterrupted one (tests/crosscoders/test_stream.py).

Where the window lives: on `device` (default: the snapshots' own), in the activations' dtype, filled forward
batch by forward batch, and each batch is gathered from it there. When the snapshots run on the device that
trains (the default), no activation crosses to the host: GPU → GPU, no round trip. Memory on that device:
len(data_ranks) × buffer_seqs × (seq_len − 1) × n_sources × d_in × 4 B (fp32 activations; 2 B where they come
out in bf16) for the window, plus one forward batch's cache and one batch; e.g. the stream recipe
(runs/pythia-160m-ge2025-stream.toml: 8 × 16 × 1023 × 32 × 768 × 4 B) holds 12.9 GB beside its snapshots.
Pass device="cpu" to keep the window in host memory instead (each row then crosses once).

Data parallel: D ranks read disjoint sequences (rank d takes the d-th block of each window) and the global
batch is their concatenation; `data_ranks=range(D)` in one process yields those global batches (the
reference a D-rank run equals). Source parallel: pass this rank's snapshots only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .errors import UserError
from .harvest import ModelLike, _device, _load, keep_mask, model_acts, stop_layer
from .precision import autocast_context, resolve_autocast


class StreamError(UserError, ValueError):
    """A stream that cannot give what was asked (too few tokens, a resume on another stream)."""


class ShuffleStream:
    """Batches [batch_size * len(data_ranks), n_sources, d_in] from `models` on `tokens`, normalised by `scales`."""

    def __init__(self, models: Sequence[ModelLike], tokens: Int[Tensor, "n_seq seq_len"], hook: str, batch_size: int,
                 *, buffer_seqs: int = 256, seed: int = 0, data_size: int = 1, data_ranks: Sequence[int] = (0,),
                 scales: Tensor | None = None, model_batch: int = 32, exclude_bos: bool = True,
                 bos_token_id: int | None = None, pad_token_id: int | None = None, autocast: str = "none",
                 device: str | torch.device | None = None):
        self.loaders, self.hook, self.batch_size = list(models), hook, int(batch_size)
        self.tokens = torch.as_tensor(tokens)
        self.buffer_seqs, self.seed, self.data_size = int(buffer_seqs), int(seed), int(data_size)
        self.data_ranks = list(data_ranks)
        self.model_batch, self.autocast, self.device = model_batch, autocast, device
        self.scales = None if scales is None else torch.as_tensor(scales, dtype=torch.float32)
        self.keep = keep_mask(self.tokens, exclude_bos, bos_token_id, pad_token_id)
        self.kept_per_seq = self.keep.sum(1)
        self.windows_per_epoch = self.tokens.shape[0] // (self.data_size * self.buffer_seqs)
        if self.windows_per_epoch < 1:
            raise StreamError(f"{self.tokens.shape[0]} sequences cannot fill one window of {self.buffer_seqs} "
                              f"sequences on each of {self.data_size} data rank(s): lower buffer_seqs or add tokens")
        if not all(0 <= d < self.data_size for d in self.data_ranks):
            raise StreamError(f"data_ranks {self.data_ranks} outside 0..{self.data_size - 1}")
        self._models: list[nn.Module] | None = None
        self._plans: dict[int, tuple[Tensor, list[int]]] = {}
        if min(self._plan(0)[1]) < 1:
            raise StreamError(f"a window of {self.buffer_seqs} sequences holds fewer than batch_size={batch_size} "
                              "tokens: raise buffer_seqs")

    # ------------------------------------------------------------------ where each step's batch comes from
    def _plan(self, epoch: int) -> tuple[Tensor, list[int]]:
        """Epoch's sequence order and batches per window (the smallest over the data ranks, so ranks agree)."""
        if epoch not in self._plans:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.tokens.shape[0], generator=g)
            W, D = self.buffer_seqs, self.data_size
            kept = self.kept_per_seq[order[: self.windows_per_epoch * D * W]].view(-1, D, W).sum(-1)
            self._plans = {epoch: (order, (kept.min(1).values // self.batch_size).tolist())}
        return self._plans[epoch]

    def position(self, step: int) -> dict:
        """Where global batch `step` lies: epoch, window, batch in the window, sequences consumed, window seed."""
        epoch = 0
        while True:
            counts = self._plan(epoch)[1]
            if step < sum(counts):
                break
            step -= sum(counts)
            epoch += 1
        w = 0
        while step >= counts[w]:
            step -= counts[w]
            w += 1
        seqs = (epoch * self.windows_per_epoch + w) * self.data_size * self.buffer_seqs
        return {"epoch": epoch, "window": w, "batch_in_window": step, "sequences_consumed": seqs,
                "window_seed": self._window_seed(epoch, w, 0), "buffer_seqs": self.buffer_seqs,
                "data_size": self.data_size, "n_seq": int(self.tokens.shape[0])}

    def check_position(self, saved: dict, step: int) -> None:
        """Refuse to resume a checkpoint on a stream that would not continue it."""
        now = self.position(step)
        if saved != now:
            raise StreamError(f"the checkpoint's token-stream position {saved} is not this stream's at step {step} "
                              f"({now}): the tokens, buffer_seqs, seed or data-parallel size changed; use a new out_dir")

    def _window_seed(self, epoch: int, window: int, rank: int) -> int:
        return ((self.seed * 1_000_003 + epoch) * 100_003 + window) * 1009 + rank

    # ------------------------------------------------------------------ the activations
    def models(self) -> list[nn.Module]:
        if self._models is None:  # this rank's snapshots stay in memory for the whole run
            self._models = [_load(m) for m in self.loaders]
        return self._models

    def window_acts(self, epoch: int, window: int, rank: int) -> Float[Tensor, "rows n_sources d_in"]:
        """Raw activations of one rank's window, in token order (before the shuffle), on the window's device
        (module docstring), in the dtype the snapshots give them."""
        order = self._plan(epoch)[0]
        W = self.buffer_seqs
        start = (window * self.data_size + rank) * W
        idx = order[start:start + W].sort().values
        tokens, keep = self.tokens[idx], self.keep[idx]
        models = self.models()
        out: Tensor | None = None
        for j, model in enumerate(models):
            dev = _device(model)
            amp = autocast_context(resolve_autocast(self.autocast, dev), dev)
            row = 0
            for i in range(0, len(tokens), self.model_batch):
                k = keep[i:i + self.model_batch]
                with torch.no_grad(), amp:
                    _, cache = model.run_with_cache(tokens[i:i + self.model_batch].to(dev), names_filter=[self.hook],
                                                    stop_at_layer=stop_layer(self.hook))
                acts = cache[self.hook][k.to(dev)]  # [kept rows, d_in], in token order
                if out is None:  # one buffer for the window: no per-source copies, no stack
                    window_dev = dev if self.device is None else torch.device(self.device)
                    out = torch.empty(int(keep.sum()), len(models), acts.shape[-1], dtype=acts.dtype, device=window_dev)
                out[row:row + len(acts), j] = acts  # copy_: across devices only where the window lives elsewhere
                row += len(acts)
        return out

    def _window_batches(self, epoch: int, window: int, skip: int) -> Iterator[Tensor]:
        n = self._plan(epoch)[1][window]
        parts = []
        for d in self.data_ranks:
            x = self.window_acts(epoch, window, d)
            g = torch.Generator().manual_seed(self._window_seed(epoch, window, d))
            # the shuffle as row indices (CPU generator: the same order on every device), gathered per batch
            perm = torch.randperm(len(x), generator=g)[: n * self.batch_size].to(x.device)
            parts.append((x, perm.view(n, self.batch_size)))
        scale = None
        if self.scales is not None:
            scale = self.scales.to(parts[0][0].device)[None, :, None]
        for b in range(skip, n):
            x = torch.cat([w[p[b]] for w, p in parts]).float()
            yield x * scale if scale is not None else x

    def __call__(self, start_step: int = 0) -> Iterator[Float[Tensor, "batch n_sources d_in"]]:
        """Batches from global step `start_step` on, forever (epochs follow each other)."""
        p = self.position(start_step)
        epoch, window, skip = p["epoch"], p["window"], p["batch_in_window"]
        while True:
            yield from self._window_batches(epoch, window, skip)
            skip, window = 0, window + 1
            if window == self.windows_per_epoch:
                epoch, window = epoch + 1, 0


def measure_stream_scales(models: Sequence[ModelLike], tokens: Tensor, hook: str, n_seqs: int,
                          **kw) -> tuple[Tensor, int]:
    """Per-source sqrt(d_in) / E|x_s| on the first `n_seqs` sequences, one model in memory at a time (the
    scales every rank then uses; `harvest.measure_scales`'s definition), and d_in."""
    tokens = torch.as_tensor(tokens)[:n_seqs]
    keep = keep_mask(tokens, kw.pop("exclude_bos", True), kw.pop("bos_token_id", None), kw.pop("pad_token_id", None))
    out = []
    for m in models:
        model = _load(m)
        x = model_acts(model, tokens, [hook], kw.get("model_batch", 32), "cache", kw.get("autocast", "none"))[hook][keep]
        out.append(math.sqrt(x.shape[-1]) / x.float().norm(dim=-1).mean().clamp(min=1e-12).item())
        del model
    return torch.tensor(out, dtype=torch.float32), int(x.shape[-1])
