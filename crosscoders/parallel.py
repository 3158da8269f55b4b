"""The training loop's few points of contact with parallelism, as one object `train` calls.

`crosscoders.train.train(..., parallel=None)` runs in one process with `Local`'s behaviour (what the loop
always did). `crosscoders.distributed.Distributed` overrides these methods for `torch.distributed` ranks
(data parallel, source parallel, both): the loop itself stays one loop, and every parallel rule lives in
one module. Each method is the single-process rule it replaces, so `Local` changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .config import CrosscoderConfig
from .io import torch_save
from .mesh import Mesh
from .model import Crosscoder


class Local:
    """One process: the whole batch and every source are here."""

    is_writer = True
    """Whether this process writes logs, checkpoints and the final model."""
    mesh = Mesh.single()
    """The collectives the loss uses (`losses.crosscoder_loss(mesh=)`): no-ops here."""

    def build_model(self, cfg: CrosscoderConfig, device: torch.device) -> Crosscoder:
        return Crosscoder(cfg).to(device)

    def resume_state(self, state: dict, path: Path) -> dict:
        """Check a loaded checkpoint fits this process layout (and complete it with this rank's shard)."""
        layout = state.get("parallel")
        if layout and layout.get("world", 1) != 1:
            raise ValueError(f"checkpoint {path} was written by a {layout['world']}-rank run "
                             f"(data {layout['data']} x source {layout['source']}); resume it with "
                             f"`torchrun --nproc_per_node={layout['world']}` and the same source_parallel, "
                             "or use a new out_dir")
        return state

    def batch_mean(self, x: Tensor) -> Tensor:
        """Mean over the (global) batch: [batch, n_sources, d_in] -> [n_sources, d_in]."""
        return x.mean(0)

    def sync_grads(self, model: Crosscoder) -> None:
        """Make every rank hold the gradient of the global loss (nothing to do in one process)."""

    def clip_grad_norm_(self, model: Crosscoder, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def any_(self, fired: Tensor) -> Tensor:
        """Latents active on some token of the global batch (in some source)."""
        return fired

    def global_rows(self, n: int) -> int:
        """Tokens in the global batch, given this rank's `n`."""
        return n

    def save_checkpoint(self, path: Path, state: dict) -> None:
        torch_save(path, state)

    def full_model(self, model: Crosscoder) -> Crosscoder:
        """The whole crosscoder (every source) on the CPU, a copy."""
        import copy

        return copy.deepcopy(model).cpu()

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
