"""Configs of the crosscoder and of its training loop (the config *is* the CLI, see `dataclass_cli.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Activation = Literal["relu", "jumprelu", "batchtopk"]
SPARSITY_COEF = {"relu": 1.0, "jumprelu": 4.0, "batchtopk": 0.0}
"""Default sparsity coefficient per scheme (TrainConfig.sparsity_coef = None), on normalised activations."""
Gate = Literal["shared", "per_source"]


@dataclass
class CrosscoderConfig:
    """Shape and sparsity scheme of a crosscoder over `n_sources` activation sources."""

    n_sources: int = 0
    """Number of activation sources (snapshots, layers, models); 0 = take it from the data."""
    d_in: int = 0
    """Width of each source's activation vector; 0 = take it from the data."""
    d_sae: int = 1024
    """Number of latents (dictionary size), shared by all sources."""
    activation: Activation = "batchtopk"
    """Sparsity scheme: relu + decoder-norm-weighted L1 (Lindsey et al. 2024; L2 norm over sources by default, see
    TrainConfig.sparsity), jumprelu + tanh penalty
    (Ge et al. 2025), batchtopk + AuxK (Bussmann et al. 2024; Minder et al. 2025)."""
    gate: Gate = "shared"
    """shared: one code for all sources, f = act(pre) gated on pre * sum_s |W_dec[s,i]| (Lindsey et al. 2024);
    per_source: shared pre-activation, one gate per source with that source's decoder norm,
    f[s,i] = act(pre_i |W_dec[s,i]|) / |W_dec[s,i]| (Ge et al. 2025; OpenMOSS models/crosscoder.py).
    Defined for relu and jumprelu; batchtopk refuses it."""
    k: float = 32.0
    """batchtopk: mean number of active latents per token over a batch."""
    dec_init_norm: float = 0.1
    """Initial norm of each latent's decoder vector concatenated over sources (Anthropic, Apr 2024 update:
    small fixed decoder norms, encoder = decoder transpose)."""
    jumprelu_init_threshold: float = 0.1
    """jumprelu: initial threshold on the decoder-norm-scaled pre-activation."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the rectangle kernel of the threshold's pseudo-gradient (Rajamanoharan et al. 2024), in
    the gate's units z = pre * |W_dec|. A kernel much wider than the thresholds (2.0, the earlier default)
    averages the reconstruction's pull over every active token and drives every threshold to 0: on the demo a
    per-source gate then fires identically in all 21 snapshots; at 0.05 the thresholds stay positive and the
    per-snapshot L0 follows the snapshots (143 at init, 34-38 at steps 16-64). Planted recovery is unchanged."""
    jumprelu_ste_to_input: bool = False
    """jumprelu: the threshold's pseudo-gradient also reaches the pre-activation and decoder norms
    (Anthropic Jan 2025); False = DeepMind's JumpReLU (threshold only), which recovered planted
    features better in our synthetic tests."""
    tanh_scale: float = 1.0
    """jumprelu: c in the sparsity penalty sum_i tanh(c * f_i * sum_s |W_dec[s,i]|) (Anthropic, Jan 2025, use 4;
    1 recovered planted features better in our tests)."""
    seed: int = 0
    """Seed of the weight initialisation."""


@dataclass
class TrainConfig:
    """Training of a crosscoder on batches of activations `[batch, n_sources, d_in]`."""

    crosscoder: CrosscoderConfig = field(default_factory=CrosscoderConfig)
    """The model to train (a table `[crosscoder]` in TOML; flags of CrosscoderConfig on the CLI)."""
    steps: int = 10_000
    """Optimiser steps (one batch each)."""
    batch_size: int = 4096
    """Tokens per batch (used by the CLI to read the store; the loop takes whatever batches come)."""
    lr: float | None = None
    """Peak learning rate of Adam. None = 2e-4 x sqrt(2^14 / d_sae) (`lr_resolved`): Gao et al. 2024's
    1/sqrt(latents) scaling, as EleutherAI's sparsify sets its default (8e-4 at 1,024 latents, 1.6e-4 at 24,576)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    weight_decay: float = 0.0
    """AdamW weight decay (0 = plain Adam)."""
    lr_warmup_frac: float = 0.05
    """Fraction of steps of linear LR warm-up from 0."""
    lr_decay: Literal["linear", "cosine", "none"] = "linear"
    """Shape of the LR decay after `lr_decay_start_frac` (Anthropic Apr 2024: linear to 0 over the last fifth)."""
    lr_decay_start_frac: float = 0.8
    """Fraction of steps after which the LR decays."""
    min_lr_frac: float = 0.0
    """LR at the end of training, as a fraction of the peak."""
    sparsity_coef: float | None = None
    """Coefficient of the sparsity penalty (unused by batchtopk); None = the scheme's default, `SPARSITY_COEF`
    (relu + l1_l2: 1, jumprelu + tanh_joint: 4; what recovers planted features, tests/crosscoders/test_recovery.py)."""
    sparsity: Literal["auto", "l1", "l1_l2", "tanh", "tanh_joint", "tanh_quad"] = "auto"
    """Sparsity penalty (relu, jumprelu): auto = the scheme's own (relu: l1_l2, the code times the L2 norm of
    the decoder over sources, which does not reward splitting a feature over snapshots; jumprelu: tanh_joint,
    sum_i tanh(c sum_s f[s,i] |W_dec[s,i]|), the same as tanh for the shared gate and, for the per-source gate,
    one term per latent, which does not reward splitting either: recovered 0.97-1.00 of planted features
    against 0.72-0.93 with tanh's per-source mean, tests/crosscoders/test_recovery.py);
    l1 = Lindsey et al. 2024's code times the sum of decoder norms; tanh_quad = Ge et al. 2025's
    sum_i p_i (1 + p_i / frequency_scale), p_i the batch (and source) mean of tanh(c f_i N_i) (OpenMOSS
    `sparsity_loss_type="tanh-quad"`)."""
    frequency_scale: float = 0.01
    """tanh_quad: s in p_i (1 + p_i / s); latents firing more often than s pay quadratically (OpenMOSS default)."""
    sparsity_warmup_frac: float = 0.05
    """Fraction of steps over which the sparsity coefficient rises linearly from 0 (Anthropic Apr 2024)."""
    auxk_coef: float = 1 / 32
    """batchtopk: coefficient of the AuxK loss for dead latents (Gao et al. 2024)."""
    k_aux: int = 0
    """batchtopk: latents in the AuxK reconstruction; 0 = d_in // 2 (Gao et al. 2024, App. B.1)."""
    nested_k_frac: float = 0.25
    """batchtopk: also reconstruct from the top `nested_k_frac * k` entries of the batch's code alone, a loss term
    weighted by `nested_k_coef` (0 = off): Gao et al. 2024's Multi-TopK adds L(4k) / 8 to L(k), Balagansky et al.
    2025's HierarchicalTopK sums L over budgets; here L(k / 4). Where k exceeds the true L0, BatchTopK finds
    degenerate solutions, a latent firing for either of two features plus latents correcting it (Chanin &
    Garriga-Alonso 2025, *Sparse but Wrong*); they spend two slots per feature, and the small budget charges them.
    Planted data (tests/crosscoders/test_recovery.py, 2000 steps, recovered over seeds 0-2 x S8xD32, S6xD16): k = 1.5 x the
    planted L0: 0.81-0.93 off, 0.97-1.00 at 0.5, 1.00 at 0.25, 0.89-0.97 at 0.75; k = 2 x: 0.64-0.89 off, 0.97-1.00 at
    0.5, 1.00 at 0.25; k = the L0: 0.92-1.00 off, 1.00 at 0.25. FVU at k = 1.5 x: 0.048-0.068 against 0.048-0.071
    off (no worse); a CPU step 15-30% slower (one more decode of k / 4 latents per token)."""
    nested_k_coef: float = 1.0
    """batchtopk: coefficient of the nested top-k reconstruction (see `nested_k_frac`)."""
    pre_act_coef: float = 0.01
    """jumprelu: coefficient of the pre-activation loss pulling dead latents up to their threshold
    (Anthropic, Jan 2025, use 3e-6 in their units; 0.01 on our normalised activations revived the dead
    latents that left short-lived planted features unrecovered, tests/crosscoders/test_recovery.py)."""
    topk_threshold_lr: float = 0.01
    """batchtopk: EMA rate of the inference threshold (running mean of the smallest kept activation)."""
    dead_tokens: int | None = None
    """A latent not active for this many training tokens counts as dead: the target of AuxK (batchtopk) and of
    the pre-activation loss (jumprelu), and `dead_frac` in the log. None = relative to the run's length, 5% of
    its tokens (steps x batch_size), between one batch and 1M (`dead_tokens_resolved`). A fixed 1M window is
    longer than a 1,000-step run of 384-token batches: AuxK never saw a dead latent, and on the demo's store
    94% of 1,024 latents ended dead (57 firing, held-out FVU 0.41; evolution/crosscoder/quality.py)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    b_dec_init: Literal["mean", "zeros"] = "mean"
    """Initialise each source's b_dec at the mean of the first batch, or at zero."""
    autocast: Literal["auto", "none", "bf16"] = "auto"
    """Mixed precision of the matmuls: "auto" = bf16 only where a measured probe finds it faster on this
    device (crosscoders/precision.py), "none" = fp32, "bf16" = always (warns where it is slow)."""
    device: str = "cpu"
    """Torch device."""
    log_every: int = 50
    """Write a row of training metrics to train_log.jsonl every this many steps."""
    eval_every: int = 0
    """Evaluate on `eval_batch` every this many steps (0 = only at the end)."""
    checkpoint_every: int = 1000
    """Write out_dir/checkpoint/state.pt every this many steps (exact resume from there)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    sparse: bool | None = None
    """Decode and backpropagate through the active latents only (crosscoders/sparse.py, sparse_jumprelu.py: the
    same loss and gradients): None = where it pays (measured crossovers; dense on CUDA), true / false to pin it
    (a CPU rehearsal of a GPU run pins false to hold what the GPU will)."""
    prefetch: int = 2
    """Batches read, checked and (for CUDA) pinned ahead of the step on a background thread
    (crosscoders/prefetch.py); 0 = read each in the loop. The batches are the same either way."""

    @property
    def lr_resolved(self) -> float:
        """`lr`, or for None 2e-4 x sqrt(2^14 / d_sae)."""
        return float(self.lr) if self.lr is not None else 2e-4 * (2**14 / self.crosscoder.d_sae) ** 0.5

    @property
    def dead_tokens_resolved(self) -> int:
        """`dead_tokens`, or for None 5% of the run's tokens, at least one batch and at most 1M."""
        if self.dead_tokens is not None:
            return int(self.dead_tokens)
        return max(self.batch_size, min(1_000_000, self.steps * self.batch_size // 20))
