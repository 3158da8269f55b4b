"""Train a crosscoder on batches of activations; resumable exactly; `python -m crosscoders.train`.

Batch contract. `batches` is either
  * a callable `batches(start_step) -> iterator` yielding the batch of step `start_step` first
    (e.g. `PlantedFeatures.batch_source(n)`), the cheap way to resume; or
  * an iterable. On resume the trainer re-iterates it from the start and skips the batches already
    consumed, so it must yield the same sequence each time it is iterated (a list, or a reader
    created with a fixed seed).
Batches are `[batch, n_sources, d_in]` already normalised (`x * norm_scale`); pass `norm_scale` so the
saved model has it folded in and works on raw activations.

Exact resume: `out_dir/checkpoint/state.pt` holds model, optimiser, scheduler, step, dead-latent
counters and RNG state, written atomically every `checkpoint_every` steps. A run killed after step
n resumes from the last checkpoint, redoes the same steps on the same batches, and ends in the same
weights as an uninterrupted run (tests/crosscoders/test_train.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from .config import SPARSITY_COEF, CrosscoderConfig, TrainConfig
from .dataclass_cli import add_arguments, from_dict, to_dict
from .errors import UserError
from .evaluation import active_latents, evaluate
from .io import append_jsonl, read_jsonl, write_json, write_text
from .losses import crosscoder_loss
from .mesh import DEFAULT_TIMEOUT_S, check_device
from .model import Crosscoder, check_initial_code
from .parallel import Local
from .precision import autocast_context, describe, resolve_autocast
from .prefetch import Prefetcher
from .progress import progress_bar

BatchSource = Iterable[Tensor] | Callable[[int], Iterable[Tensor]]
CHECKPOINT = "checkpoint/state.pt"
LOG = "train_log.jsonl"
# Fields that may change between a run and its resume without changing the result.
_RESUME_FREE = {"progress", "log_every", "eval_every", "checkpoint_every", "prefetch", "sparse"}


def warmup_decay(step: int, total: int, warmup: int, decay_start: int, min_frac: float, shape: str) -> float:
    """LR multiplier at update `step` (0-based): linear warm-up over `warmup` updates, flat until
    `decay_start`, then "linear" / "cosine" decay to `min_frac` at `total` ("none": no decay).
    The crosscoder's and the mini-Pythia's schedules are both this function."""
    if step < warmup:
        return (step + 1) / warmup
    if shape == "none" or step < decay_start:
        return 1.0
    t = min(1.0, (step - decay_start) / max(total - decay_start, 1))
    s = 1 - t if shape == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return min_frac + (1 - min_frac) * s


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The crosscoder's schedule: warm-up, flat, then linear or cosine decay to `min_lr_frac`."""
    return warmup_decay(step, cfg.steps, int(cfg.lr_warmup_frac * cfg.steps), int(cfg.lr_decay_start_frac * cfg.steps),
                        cfg.min_lr_frac, cfg.lr_decay)


MAX_EPOCHS = 4.0
"""Passes over the stored tokens above which `check_epochs` warns."""


def check_epochs(cfg: TrainConfig, n_tokens_stored: int, max_epochs: float = MAX_EPOCHS) -> float:
    """Passes over the store that `cfg` makes (steps x batch_size / tokens stored); warns above `max_epochs`:
    a crosscoder that cycles the same tokens many times fits them, not the distribution (harvest more tokens
    or train fewer steps)."""
    seen = cfg.steps * cfg.batch_size
    epochs = seen / max(n_tokens_stored, 1)
    if epochs > max_epochs:
        warnings.warn(f"the crosscoder will see {seen:,} tokens = {epochs:.1f} epochs over the {n_tokens_stored:,} "
                      f"tokens stored (more than {max_epochs:g}): harvest more tokens or train fewer steps",
                      stacklevel=2)
    return epochs


def sparsity_coef(cfg: TrainConfig) -> float:
    """The sparsity coefficient: the configured one, or the scheme's default (`config.SPARSITY_COEF`)."""
    return SPARSITY_COEF[cfg.crosscoder.activation] if cfg.sparsity_coef is None else cfg.sparsity_coef


def sparsity_factor(cfg: TrainConfig, step: int) -> float:
    warm = int(cfg.sparsity_warmup_frac * cfg.steps)
    return 1.0 if step >= warm else (step + 1) / warm


def _iterate(batches: BatchSource, start_step: int) -> Iterator[Tensor]:
    if callable(batches) and not hasattr(batches, "__iter__"):
        return iter(batches(start_step))
    return itertools.islice(iter(batches), start_step, None)


def _inputs(it: Iterator[Tensor], dev: torch.device, depth: int, prepare) -> Iterator[Tensor]:
    """The loop's batches on `dev` in fp32: prefetched `depth` ahead on a thread, or (0) read in the loop."""
    if depth > 0:
        return Prefetcher(it, dev, depth, prepare)
    return (prepare(torch.as_tensor(x), i).to(dev, torch.float32) for i, x in enumerate(it))


def _check_batch(model: Crosscoder, x: Tensor, step: int) -> None:
    try:
        model.check_input(x)
    except ValueError as e:
        raise ValueError(f"batch of step {step}: {e}") from None
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"batch of step {step} holds {bad} non-finite activation value(s) (NaN/inf); "
            "check the activation store or the model that produced it"
        )


def _check_finite_loss(bad_step: Tensor) -> None:
    if (s := int(bad_step)) >= 0:
        raise FloatingPointError(f"loss became non-finite at step {s} (finite inputs); try a lower lr or autocast=none")


def _resume_key(cfg: TrainConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in _RESUME_FREE}


def _resolve_shapes(cfg: TrainConfig, it: Iterator[Tensor]) -> tuple[TrainConfig, Iterator[Tensor]]:
    cc = cfg.crosscoder
    if cc.n_sources and cc.d_in:
        return cfg, it
    first = next(it)
    cc = from_dict(CrosscoderConfig, {**to_dict(cc), "n_sources": first.shape[1], "d_in": first.shape[2]})
    return from_dict(TrainConfig, {**to_dict(cfg), "crosscoder": to_dict(cc)}), itertools.chain([first], it)


def train(
    cfg: TrainConfig,
    batches: BatchSource,
    out_dir: str | Path,
    norm_scale: Tensor | None = None,
    eval_batch: Tensor | None = None,
    parallel: Local | None = None,
) -> Crosscoder:
    """Train (or resume training of) a crosscoder; save it to `out_dir` (cfg.json + weights.safetensors,
    `norm_scale` folded in) and return the saved model (it works on raw activations).
    `parallel`: this rank's share of a torch.distributed run (crosscoders/distributed.py); None = one process."""
    par = parallel or Local()
    dev = check_device(cfg.device)  # a device this machine lacks: one clear error before any batch is made
    if par.mesh.world > 1 and dev.type == "cuda":
        dev = torch.device(par.mesh.device)  # this rank's GPU, cuda:{LOCAL_RANK} (Mesh.init)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    state = None
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read checkpoint {ckpt_path}: {e}; delete it to start afresh") from e
        state = par.resume_state(state, ckpt_path)
        saved = from_dict(TrainConfig, state["train_config"])
        cfg = from_dict(TrainConfig, {**to_dict(cfg), "crosscoder": to_dict(saved.crosscoder)}) \
            if not (cfg.crosscoder.n_sources and cfg.crosscoder.d_in) else cfg
        if _resume_key(saved) != _resume_key(cfg):
            diff = sorted(k for k, v in _resume_key(cfg).items() if _resume_key(saved).get(k) != v)
            raise ValueError(f"checkpoint {ckpt_path} was written with a different config (fields: {diff}); "
                             "use a new out_dir or delete the checkpoint")
    step = state["step"] if state else 0
    if state and "data_position" in state and hasattr(batches, "check_position"):
        batches.check_position(state["data_position"], step)  # a stream (crosscoders/stream.py) continues there
    it = _iterate(batches, step)
    cfg, it = _resolve_shapes(cfg, it)

    model = par.build_model(cfg.crosscoder, dev)
    opt_cls = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
    # fused: one kernel over all parameters; on CPU the step at 8 × 256 × 16384 took 112 ms against 633 ms
    # (benchmarks/README.md). Same update rule; a fused run resumes exactly into a fused run.
    opt = opt_cls(model.parameters(), lr=cfg.lr_resolved, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                  fused=dev.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    since_fired = torch.zeros(cfg.crosscoder.d_sae, dtype=torch.long, device=dev)
    tokens_seen = 0
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        since_fired = state["since_fired"].to(dev)
        tokens_seen = state["tokens_seen"]
        torch.set_rng_state(state["rng"])
        # Drop log rows written after the checkpoint: they are about to be redone.
        rows = [r for r in read_jsonl(out / LOG) if r.get("step", 0) <= step]
        if par.is_writer:
            write_text(out / LOG, "".join(json.dumps(r) + "\n" for r in rows))
    elif par.is_writer:
        (out / LOG).unlink(missing_ok=True)
    par.barrier()  # no rank appends to the log before the writer has reset it
    if par.is_writer:
        write_json(out / "train_config.json", to_dict(cfg))

    precision = resolve_autocast(cfg.autocast, dev)
    if par.is_writer:
        write_json(out / "precision.json", describe(cfg.autocast, precision, dev))  # what "auto" chose here
    if cfg.progress and par.is_writer:
        print(f"crosscoder: computing in {'bf16' if precision == 'bf16' else 'fp32'} (autocast={cfg.autocast!r})",
              file=sys.stderr)
    amp = autocast_context(precision, dev)
    model.train()
    bar = progress_bar(total=cfg.steps, initial=step, disable=not (cfg.progress and par.is_writer), desc="crosscoder", unit="step")
    t0, tok0 = time.perf_counter(), tokens_seen
    bad_step = torch.full((), -1, dtype=torch.long, device=dev)
    # the batches come from a thread that reads and checks them ahead of the step (crosscoders/prefetch.py);
    # the check runs there, on the tensor the source made (the CPU for a store): no device sync in the loop
    inputs = _inputs(it, dev, cfg.prefetch, lambda x, i, s0=step: _check_batch(model, x, s0 + i) or x)
    try:
        while step < cfg.steps:
            try:
                x = next(inputs)
            except StopIteration:
                bar.write(f"batches ran out at step {step} of {cfg.steps}; stopping there")
                break
            if step == 0 and cfg.b_dec_init == "mean":
                with torch.no_grad():
                    model.b_dec.copy_(par.batch_mean(x))
            if step == 0 and par.mesh.world == 1:  # an empty or dense JumpReLU code at init: a warning naming the field
                check_initial_code(model, x)
            coef = sparsity_coef(cfg) * sparsity_factor(cfg, step)
            dead = since_fired >= cfg.dead_tokens_resolved
            with amp:
                loss = crosscoder_loss(model, x, coef, dead, cfg.auxk_coef, cfg.k_aux, cfg.pre_act_coef,
                                       sparse=cfg.sparse, sparsity=cfg.sparsity, frequency_scale=cfg.frequency_scale,
                                       nested_k_frac=cfg.nested_k_frac, nested_k_coef=cfg.nested_k_coef, mesh=par.mesh)
            # the first step whose loss was not finite, kept on the device: reading it every step would make the
            # host wait for each step; it is read at every log row and before every checkpoint, which then never
            # holds the diverged weights
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.total.detach()), step, bad_step)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            par.sync_grads(model)
            if cfg.grad_clip > 0:
                par.clip_grad_norm_(model, cfg.grad_clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                fired = par.any_(active_latents(loss.f).any(0))
                since_fired += par.global_rows(x.shape[0])
                since_fired.masked_fill_(fired, 0)  # `since_fired[fired] = 0` would read the mask's size on the host
                if cfg.crosscoder.activation == "batchtopk" and loss.min_kept is not None:
                    # Inference threshold: running mean of the smallest kept activation (Bussmann et al. 2024).
                    r = 1.0 if step == 0 else cfg.topk_threshold_lr
                    model.threshold.mul_(1 - r).add_(r * loss.min_kept.float())
                if cfg.crosscoder.activation == "jumprelu":
                    model.threshold.clamp_(min=0)  # a negative gate would pass negative pre-activations
            step += 1
            tokens_seen += par.global_rows(x.shape[0])
            logs = par.is_writer and (step % cfg.log_every == 0 or step == cfg.steps)
            if logs or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _check_finite_loss(bad_step)
            if logs:
                xc = x - x.mean(0)
                fvu = (loss.mse_per_source / xc.pow(2).sum(-1).mean(0).clamp(min=1e-12)).tolist()
                row = {"step": step, "tokens_seen": tokens_seen, "lr": sched.get_last_lr()[0],
                       "sparsity_coef": coef, "loss": loss.total.item(), "mse": loss.mse.item(),
                       "sparsity": loss.sparsity.item(), "aux": loss.aux.item(), "fvu": fvu,
                       **({"nested": loss.nested.item()} if loss.nested is not None else {}),
                       "l0": active_latents(loss.f).sum(-1).float().mean().item(),
                       "dead_frac": (since_fired >= cfg.dead_tokens_resolved).float().mean().item(),
                       "tok_per_s": (tokens_seen - tok0) / max(time.perf_counter() - t0, 1e-9)}
                append_jsonl(out / LOG, row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", fvu=f"{sum(fvu) / len(fvu):.3f}", l0=f"{row['l0']:.1f}")
            if eval_batch is not None and cfg.eval_every and step % cfg.eval_every == 0:
                append_jsonl(out / LOG, {"step": step, "eval": evaluate(model, [eval_batch])})
                model.train()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                par.save_checkpoint(ckpt_path, {"step": step, "tokens_seen": tokens_seen, "model": model.state_dict(),
                                                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                                "since_fired": since_fired, "rng": torch.get_rng_state(),
                                                "train_config": to_dict(cfg),
                                                **({"data_position": batches.position(step)}
                                                   if hasattr(batches, "position") else {})})
            bar.update(1)
    finally:
        inputs.close()
    bar.close()
    _check_finite_loss(bad_step)
    model.eval()
    if eval_batch is not None:
        append_jsonl(out / LOG, {"step": step, "eval": evaluate(model, [eval_batch.to(dev)]), "final": True})
    final = par.full_model(model)
    if norm_scale is not None:
        final.fold_norm_scale(norm_scale)
    if par.is_writer:
        final.save(out)
    par.barrier()
    return final


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crosscoders.train",
        description="Train a crosscoder on an activation store: in this process, or as one rank of "
                    "`torchrun --nproc_per_node=N -m crosscoders.train ...` (data x source parallel).")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors (bad store, shapes)")
    p.add_argument("--store", required=True, help="activation store directory (manifest.json + shards)")
    p.add_argument("--out", required=True, help="output directory (model, log, checkpoint)")
    p.add_argument("--seed-data", type=int, default=0, help="seed of the store's shuffled reader")
    p.add_argument("--eval-tokens", type=int, default=0,
                   help="tokens of the store evaluated on after training (one process only)")
    dist_group = p.add_argument_group("under torchrun (crosscoders/distributed.py)")
    dist_group.add_argument("--source-parallel", type=int, default=1,
                            help="ranks that split the snapshots (P); the other factor of the world size splits the batch")
    dist_group.add_argument("--stop-at-step", type=int, default=0,
                            help="end this job after that step (a checkpoint step: set checkpoint_every to divide it), "
                                 "to go on later from the checkpoint, e.g. in scheduler slots shorter than the run (0 = never)")
    dist_group.add_argument("--backend", default=None, help="torch.distributed backend (default: nccl on cuda, gloo on cpu)")
    dist_group.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                            help="seconds a collective waits for the slowest rank (crosscoders/mesh.py, DEFAULT_TIMEOUT_S)")
    add_arguments(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    add_arguments(p.add_argument_group("model (CrosscoderConfig)"), CrosscoderConfig)
    return p


def main(argv: list[str] | None = None) -> Crosscoder:
    """`python -m crosscoders.train --store DIR --out DIR [TrainConfig and CrosscoderConfig flags]`; the same
    command under `torchrun` trains data x source parallel: each rank reads its rows and snapshots of every
    global batch of the store (`ActivationStore.batches(rows=, sources=)`), rank 0 writes the log, checkpoints and model.
    A rank that dies makes the others fail at their next collective (gloo / NCCL raise, torchrun names the
    rank); no checkpoint is committed after the last one every rank reached."""
    ns = vars(parser().parse_args(argv))
    ns.pop("debug")
    store_dir, out_dir = ns.pop("store"), ns.pop("out")
    seed_data, eval_tokens = ns.pop("seed_data"), ns.pop("eval_tokens")
    source_parallel, backend, stop = ns.pop("source_parallel"), ns.pop("backend"), ns.pop("stop_at_step")
    timeout_s = ns.pop("timeout_s")
    cc_fields = set(CrosscoderConfig.__dataclass_fields__)
    cc = json.loads(ns.pop("crosscoder")) if "crosscoder" in ns else {}
    cc.update({k: ns.pop(k) for k in list(ns) if k in cc_fields})

    from .store import ActivationStore  # lazy: the data side is a separate module

    store = ActivationStore(store_dir)
    scales = torch.as_tensor(store.scales, dtype=torch.float32)
    cc.setdefault("n_sources", len(scales))
    cc.setdefault("d_in", int(store.manifest["d_in"]))
    cfg = from_dict(TrainConfig, {**ns, "crosscoder": cc})
    check_device(cfg.device)
    store.check_matches(cfg.crosscoder.n_sources, cfg.crosscoder.d_in)
    parallel, mesh = None, None
    if "RANK" in os.environ or source_parallel > 1:  # one rank of a torchrun job
        from .distributed import Distributed
        from .mesh import Mesh

        mesh = Mesh.init(source_parallel, device=cfg.device, backend=backend, timeout_s=timeout_s)
        mesh.source_slice(cfg.crosscoder.n_sources)  # refuse a split that does not divide before any work
        parallel = Distributed(mesh)
        if eval_tokens:
            raise UserError("--eval-tokens is evaluated in one process: evaluate the saved model afterwards")
    if mesh is None or mesh.rank == 0:
        check_epochs(cfg, store.n_tokens)
    eval_batch = None
    if eval_tokens:
        eval_batch = next(iter(store.batches(eval_tokens, seed=seed_data + 1, normalize=True)))

    def source(start: int) -> Iterator[Tensor]:
        # The store's reader is deterministic for a seed: skip what the checkpoint already consumed.
        # this rank's rows and sources of each global batch, and only those are read from disk
        mine = {} if mesh is None else {"rows": (mesh.data_rank, mesh.data),
                                        "sources": mesh.source_slice(cfg.crosscoder.n_sources)}
        glob = store.batches(cfg.batch_size, seed=seed_data, normalize=True, start_batch=start, **mine)
        return itertools.islice(glob, max(stop - start, 0)) if stop else glob

    try:
        return train(cfg, source, out_dir, norm_scale=scales, eval_batch=eval_batch, parallel=parallel)
    finally:
        if mesh is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    from .errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:], "python -m crosscoders.train"))
