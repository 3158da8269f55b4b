"""The GPU figures of issue 22, one JSON: a Pythia-160M-shaped crosscoder training step, the harvest rate through
a random-weight Pythia-160M, the CUDA sparse/dense crossover of crosscoders/sparse.py, and (two GPUs) NCCL.

    python -m benchmarks.gpu_check --out $OUT/gpu_check.json        # on the GPU box (benchmarks/gpu_check.sh)
    python -m benchmarks.gpu_check --device cpu --tiny               # the same code at toy shapes (the test)

Shapes (runs/pythia-160m-ge2025.toml): 32 sources, d_in 768, d_sae 24,576, per-source JumpReLU with Ge et al.'s
tanh-quad penalty, Adam, bf16 autocast as `autocast = "auto"` resolves on Ampere+; batches 256 and 2048. The
harvest runs `crosscoders.harvest.model_acts` (the store path, activations to the host) and the stream's
`window_acts` (kept on the device) at `blocks.6.hook_resid_post`, seq 1024, on a GPTNeoXConfig with Pythia-160M's
sizes loaded the way local snapshots are (`evolution.sources.snapshots.load_local_snapshot`). The crossover
times `crosscoder_loss` forward + backward of a BatchTopK crosscoder, sparse against dense, per k / d_sae.

Every part has a time budget and runs in a try: a part that fails or overruns is recorded in the JSON
(`error`, `skipped`), never fatal, so the script always writes its file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

PYTHIA_160M = dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True)
TINY_NEOX = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 rotary_pct=0.25, max_position_embeddings=64, use_parallel_residual=True)
PARTS = ("train_step", "harvest", "crossover", "nccl")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None


def _timed(fn, dev: torch.device, steps: int, deadline: float) -> list[float]:
    """Seconds of each of up to `steps` calls after one warm-up, stopping at `deadline`."""
    fn()
    _sync(dev)
    out = []
    for _ in range(steps):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def _median_ms(ts: list[float]) -> float | None:
    return round(sorted(ts)[len(ts) // 2] * 1e3, 3) if ts else None


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


# ---------------------------------------------------------------- parts


def train_step(dev: torch.device, tiny: bool, deadline: float) -> dict:
    """ms/step and peak memory of one Adam step of the Pythia-160M crosscoder (loss, backward, update)."""
    from crosscoders.config import CrosscoderConfig
    from crosscoders.losses import crosscoder_loss
    from crosscoders.model import Crosscoder

    S, D, H = (4, 16, 64) if tiny else (32, 768, 24576)
    batches = (16, 64) if tiny else (256, 2048)
    cc = CrosscoderConfig(n_sources=S, d_in=D, d_sae=H, activation="jumprelu", gate="per_source",
                          jumprelu_init_threshold=0.1, jumprelu_bandwidth=4.0, tanh_scale=4.0)
    model = Crosscoder(cc).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)
    rows = []
    precisions = ["bf16", "fp32"] if dev.type == "cuda" or tiny else ["fp32"]
    for precision in precisions:
        for B in batches:
            row = {"batch": B, "precision": precision}
            rows.append(row)
            if time.monotonic() > deadline:
                row["skipped"] = "time budget spent"
                continue
            x = torch.randn(B, S, D, device=dev)

            def step(x=x, precision=precision):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = crosscoder_loss(model, x, 0.3, sparsity="tanh_quad", frequency_scale=0.01)
                out.total.backward()
                opt.step()
            try:
                _reset_peak(dev)
                ts = _timed(step, dev, 3 if tiny else 10, deadline)
                row.update(ms_per_step=_median_ms(ts), steps_timed=len(ts), max_memory_allocated_GiB=_peak_gib(dev),
                           tokens_per_s=round(B / (sorted(ts)[len(ts) // 2]), 1) if ts else None)
            except Exception as e:  # noqa: BLE001 (recorded, the next shape still runs)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row["oom"] = _oom(e)
            finally:
                del x, step  # the batch goes before the next shape's
                opt.zero_grad(set_to_none=True)
                _reset_peak(dev)
    params = sum(p.numel() for p in model.parameters())
    return {"shape": {"n_sources": S, "d_in": D, "d_sae": H, "activation": "jumprelu", "gate": "per_source",
                      "sparsity": "tanh_quad", "optimizer": "Adam"}, "params": params, "rows": rows}


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(WordLevel(words, unk_token="<|endoftext|>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def random_pythia(path: Path, tiny: bool) -> Path:
    """A random-weight GPT-NeoX checkpoint with Pythia-160M's sizes (or toy ones), as a local snapshot."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**(TINY_NEOX if tiny else PYTHIA_160M), bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    _tokenizer(cfg.vocab_size).save_pretrained(path)
    return path


def harvest(dev: torch.device, tiny: bool, deadline: float) -> dict:
    """Tokens/s at `blocks.6.hook_resid_post` (tiny: blocks.1) through the store path and the stream window."""
    from crosscoders.harvest import model_acts
    from crosscoders.stream import ShuffleStream
    from evolution.sources.snapshots import load_local_snapshot

    hook = "blocks.1.hook_resid_post" if tiny else "blocks.6.hook_resid_post"
    seq, n_seq, batch = (16, 8, 4) if tiny else (1024, 64, 16)
    out: dict = {"hook": hook, "seq_len": seq, "n_seq": n_seq, "model_batch": batch}
    with tempfile.TemporaryDirectory(prefix="pythia-random-") as tmp:
        model = load_local_snapshot(random_pythia(Path(tmp) / "step0", tiny), str(dev))
    vocab = model.cfg.d_vocab
    tokens = torch.randint(1, vocab, (n_seq, seq), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    out["model"] = {"d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers, "d_vocab": vocab}
    autocast = "bf16" if dev.type == "cuda" else "none"
    cases = {
        "store_path_model_acts": lambda: model_acts(model, tokens, [hook], batch, "cache", autocast),
        "stream_window_on_device": lambda: ShuffleStream([model], tokens, hook, 1, buffer_seqs=n_seq,
                                                         model_batch=batch, autocast=autocast).window_acts(0, 0, 0),
    }
    for name, fn in cases.items():
        if time.monotonic() > deadline:
            out[name] = {"skipped": "time budget spent"}
            continue
        try:
            _reset_peak(dev)
            ts = _timed(fn, dev, 3, deadline)
            best = min(ts) if ts else None
            out[name] = {"seconds": best, "tokens_per_s": round(n_seq * seq / best, 1) if best else None,
                         "autocast": autocast, "max_memory_allocated_GiB": _peak_gib(dev)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def crossover(dev: torch.device, tiny: bool, deadline: float) -> dict:
    """Sparse against dense BatchTopK loss + backward per density k / d_sae: where the sparse path pays."""
    from crosscoders import sparse as S_
    from crosscoders.config import CrosscoderConfig
    from crosscoders.losses import crosscoder_loss
    from crosscoders.model import Crosscoder

    S, D, H, B = (4, 16, 512, 64) if tiny else (32, 768, 24576, 2048)
    densities = [1 / 8, 1 / 64] if tiny else [1 / 16, 1 / 64, 1 / 128, 1 / 256, 1 / 512, 1 / 1024]
    x = torch.randn(B, S, D, device=dev)
    rows = []
    for dens in densities:
        k = max(1.0, dens * H)
        row = {"k_over_d_sae": dens, "k": k}
        rows.append(row)
        if time.monotonic() > deadline:
            row["skipped"] = "time budget spent"
            continue
        try:
            m = Crosscoder(CrosscoderConfig(n_sources=S, d_in=D, d_sae=H, activation="batchtopk", k=k)).to(dev).train()
            for sparse in (False, True):
                def step(sparse=sparse, m=m):
                    m.zero_grad(set_to_none=True)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                        out = crosscoder_loss(m, x, 0.0, sparse=sparse)
                    out.total.backward()
                row["sparse_ms" if sparse else "dense_ms"] = _median_ms(_timed(step, dev, 2 if tiny else 5, deadline))
            if row.get("sparse_ms") and row.get("dense_ms"):
                row["sparse_speedup"] = round(row["dense_ms"] / row["sparse_ms"], 3)
            del m, step
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        _reset_peak(dev)
    paying = [r["k_over_d_sae"] for r in rows if r.get("sparse_speedup", 0) > 1]
    return {"shape": {"n_sources": S, "d_in": D, "d_sae": H, "batch": B}, "rows": rows,
            "measured_crossover": max(paying) if paying else None,
            "assumed_crossover": S_.CROSSOVER.get(dev.type)}


def nccl(dev: torch.device, tiny: bool, deadline: float) -> dict:
    """Two ranks under torchrun (all-reduce and broadcast exact, bus bandwidth); skipped on one GPU."""
    n = torch.cuda.device_count() if dev.type == "cuda" else 0
    if n < 2:
        return {"skipped": f"needs 2 GPUs, found {n}"}
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "rank0.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "benchmarks.gpu_check", "--nccl-rank", str(res)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, deadline - time.monotonic()))
        if p.returncode or not res.exists():
            return {"error": f"torchrun exit {p.returncode}: {p.stderr[-600:]}"}
        return json.loads(res.read_text())


def nccl_rank(out: str) -> None:
    """One rank of the NCCL check (run by `nccl` through torchrun)."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    x = torch.full((1024,), float(rank + 1), device=dev)
    dist.all_reduce(x)
    ok_reduce = bool((x == 3.0).all())
    y = torch.arange(8, device=dev, dtype=torch.float32) * (rank + 1)
    dist.broadcast(y, 0)
    ok_bcast = bool((y == torch.arange(8, device=dev)).all())
    big = torch.ones(64 << 20, device=dev)  # 256 MiB fp32
    dist.all_reduce(big)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(big)
    torch.cuda.synchronize()
    t = (time.perf_counter() - t0) / 5
    if rank == 0:  # ring all-reduce moves 2 (n-1)/n of the buffer per rank
        Path(out).write_text(json.dumps({"world": dist.get_world_size(), "all_reduce_exact": ok_reduce,
                                         "broadcast_exact": ok_bcast, "all_reduce_256MiB_ms": round(t * 1e3, 3),
                                         "bus_GBps": round(big.numel() * 4 * 2 * 0.5 / t / 1e9, 1)}))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- main


def environment(dev: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2**30, 1), n_gpus=torch.cuda.device_count(),
                   cuda=torch.version.cuda)
    return env


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (the CPU test of this script)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json or benchmarks/results/)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="seconds for all parts together")
    ap.add_argument("--only", nargs="*", choices=PARTS, default=list(PARTS))
    ap.add_argument("--nccl-rank", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.nccl_rank:
        nccl_rank(a.nccl_rank)
        return {}
    dev = torch.device(a.device)
    default = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out = Path(a.out) if a.out else default / "gpu_check.json"
    share = {"train_step": 0.35, "harvest": 0.25, "crossover": 0.3, "nccl": 0.1}
    result = {"environment": environment(dev), "tiny": a.tiny, "budget_s": a.budget_s, "parts": {}}
    start = time.monotonic()
    for name in PARTS:
        if name not in a.only:
            continue
        t0 = time.monotonic()
        # each part's share of the budget, plus whatever earlier parts left unused
        deadline = t0 + share[name] * a.budget_s + max(0.0, start + sum(
            share[p] for p in PARTS[:PARTS.index(name)]) * a.budget_s - t0)
        try:
            part = globals()[name](dev, a.tiny, deadline)
        except Exception as e:  # noqa: BLE001 (recorded: the other parts still run)
            part = {"error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-1500:]}
        part["seconds"] = round(time.monotonic() - t0, 2)
        result["parts"][name] = part
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every part: a killed run keeps what it measured
        print(f"{name}: {json.dumps(part)[:400]}", flush=True)
    result["total_s"] = round(time.monotonic() - start, 2)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
