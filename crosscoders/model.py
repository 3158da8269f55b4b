"""The crosscoder: per-source encoders summed into one pre-activation, per-source decoders.

    pre     = sum_s W_enc[s]^T x_s + b_enc
    shared gate     f = act(pre)                          x_hat_s = W_dec[s]^T f + b_dec[s]
                    (Lindsey et al. 2024, *Sparse Crosscoders*; code [batch, d_sae])
    per-source gate f[s] = act(pre * n_s) / n_s,  n_s = |W_dec[s, i]|,   x_hat_s = W_dec[s]^T f[s] + b_dec[s]
                    (Ge et al. 2025; OpenMOSS Language-Model-SAEs models/crosscoder.py; code [batch, n_sources, d_sae])

The per-snapshot activation of latent i in source s (`activations_per_snapshot`, one definition for every
probe, metric and browser; docs DESIGN.md): the per-source code where the gate is per-source, else
f_i * n_s[i], how much of the feature source s writes (in normalised units, see below).

A latent's decoder norm per source, `|W_dec[s, i]|`, is what the evolution study reads off
(Ge et al. 2025): its profile over snapshots says when the feature is born, peaks and fades.

Normalisation: training sees `x_s * norm_scale[s]` (each source scaled to mean norm sqrt(d_in)).
`fold_norm_scale` moves those scales into W_enc, W_dec, b_dec so that the saved model works on raw
activations, and keeps them in the `norm_scale` buffer so that `decoder_norms()` stays in the
normalised units: decoder norms of different snapshots remain comparable whatever each snapshot's
raw activation scale, and the sparsity gates (which use them) are unchanged by folding.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from einops import einsum
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor, nn

from . import activations as A
from .config import CrosscoderConfig
from .dataclass_cli import from_dict, to_dict
from .io import save_safetensors, write_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "weights.safetensors"


class Crosscoder(nn.Module):
    def __init__(self, cfg: CrosscoderConfig):
        super().__init__()
        if cfg.n_sources < 1 or cfg.d_in < 1 or cfg.d_sae < 1:
            raise ValueError(f"CrosscoderConfig needs n_sources, d_in, d_sae >= 1, got {cfg}")
        if cfg.gate not in ("shared", "per_source"):
            raise ValueError(f"CrosscoderConfig.gate must be 'shared' or 'per_source', got {cfg.gate!r}")
        if cfg.gate == "per_source" and cfg.activation == "batchtopk":
            # A per-source top-k would make each snapshot compete for one batch budget, so a snapshot with
            # large activations would take the budget of the others; Ge et al. define no such scheme.
            raise ValueError("CrosscoderConfig.gate='per_source' is not defined for activation='batchtopk' "
                             "(use gate='shared', or activation='jumprelu' / 'relu')")
        self.cfg = cfg
        S, D, H = cfg.n_sources, cfg.d_in, cfg.d_sae
        gen = torch.Generator().manual_seed(cfg.seed)
        # Anthropic, "Circuits Updates – April 2024" (training SAEs): decoder columns in random directions
        # with a small fixed norm, encoder initialised to the decoder's transpose. The norm is spread over
        # the sources so the concatenated decoder vector has norm `dec_init_norm` (shared gate), or each
        # source's slice has it (per-source gate, as OpenMOSS sets every head's decoder norm): either way
        # the gate's z = pre * norm has the same scale at init, so one threshold init and bandwidth fit both.
        W_dec = torch.randn(H, S * D, generator=gen)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * cfg.dec_init_norm
        W_dec = W_dec.view(H, S, D).permute(1, 0, 2).contiguous()
        if cfg.gate == "per_source":
            W_dec = W_dec * (cfg.dec_init_norm / W_dec.norm(dim=-1, keepdim=True))
        self.W_dec = nn.Parameter(W_dec)  # [n_sources, d_sae, d_in]
        # contiguous (a clone of the transpose would keep W_dec's layout, and every GEMM would copy it)
        self.W_enc = nn.Parameter(W_dec.transpose(1, 2).contiguous())  # [n_sources, d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(H))
        self.b_dec = nn.Parameter(torch.zeros(S, D))
        # jumprelu: learned per-latent threshold; batchtopk: running estimate (not a parameter).
        init = cfg.jumprelu_init_threshold if cfg.activation == "jumprelu" else 0.0
        threshold = torch.full((H,), float(init))
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(threshold)
        else:
            self.register_buffer("threshold", threshold)
        self.register_buffer("norm_scale", torch.ones(S))

    # ------------------------------------------------------------------ shapes and norms
    def check_input(self, x: Tensor) -> None:
        S, D = self.cfg.n_sources, self.cfg.d_in
        if x.ndim != 3 or tuple(x.shape[1:]) != (S, D):
            raise ValueError(
                f"crosscoder expects activations [batch, n_sources={S}, d_in={D}], got {list(x.shape)}: "
                "the activation sources or width do not match this crosscoder"
            )

    def decoder_norms(self) -> Float[Tensor, "d_sae n_sources"]:
        """|W_dec[s, i]| in the training (normalised) units, whether or not the scales are folded in."""
        return (self.W_dec.norm(dim=-1) * self.norm_scale[:, None]).T

    @property
    def per_source(self) -> bool:
        return self.cfg.gate == "per_source"

    def gate_norms(self) -> Float[Tensor, " d_sae"] | Float[Tensor, "n_sources d_sae"]:
        """What the gate multiplies the pre-activation by: sum_s n_s (shared) or each n_s (per-source)."""
        n = self.decoder_norms()
        return n.T if self.per_source else n.sum(-1)

    def gate_input(self, pre: Tensor) -> Tensor:
        # per-source: broadcast pre [..., d_sae] against norms [n_sources, d_sae] -> [..., n_sources, d_sae]
        return pre.unsqueeze(-2) if self.per_source else pre

    # ------------------------------------------------------------------ encode / decode
    def pre_acts(self, x: Float[Tensor, "batch n_sources d_in"]) -> Float[Tensor, "batch d_sae"]:
        # sum_s x_s W_enc[s]: one [batch, n_sources d_in] @ [n_sources d_in, d_sae] GEMM with the bias fused
        # (a separate `+ b_enc` is one more pass over [batch, d_sae], the size of the whole code).
        S, D, H = self.W_enc.shape
        return torch.addmm(self.b_enc, x.to(self.W_enc.dtype).reshape(-1, S * D), self.W_enc.reshape(S * D, H))

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The scheme's activation. batchtopk selects over the batch only in training mode; in eval
        mode (and for per-source codes) it is the learned threshold gate, so codes do not depend on
        the batch."""
        act = self.cfg.activation
        norm = self.gate_norms()
        if act == "relu":
            if self.per_source:  # relu(pre n)/n = relu(pre) where n > 0; a zero-norm slice writes nothing
                return A.relu(pre).unsqueeze(-2) * (norm > 0).to(pre.dtype)
            return A.relu(pre)
        pre = self.gate_input(pre)
        if act == "jumprelu":
            # per-source: act(pre n)/n with act(z) = z H(z - theta) is pre H(pre n - theta), what jumprelu returns
            if self.training:
                return A.jumprelu(pre, norm, self.threshold.clamp(min=0), self.cfg.jumprelu_bandwidth,
                                  self.cfg.jumprelu_ste_to_input)
            return A.threshold_gate(pre, norm, self.threshold.clamp(min=0))
        if act == "batchtopk":
            if self.training and pre.ndim == 2:
                return A.batch_topk(pre, norm, self.cfg.k)[0]
            return A.threshold_gate(pre, norm, self.threshold)
        raise ValueError(f"unknown activation {act!r}")

    def encode(self, x: Float[Tensor, "batch n_sources d_in"]) -> Tensor:
        """The code: [batch, d_sae] for the shared gate, [batch, n_sources, d_sae] for the per-source gate."""
        self.check_input(x)
        return self.activate(self.pre_acts(x))

    def decode(self, f: Tensor) -> Float[Tensor, "batch n_sources d_in"]:
        if f.ndim == 3:  # per-source code
            return einsum(f.to(self.W_dec.dtype), self.W_dec, "b s h, s h d -> b s d") + self.b_dec
        return einsum(f.to(self.W_dec.dtype), self.W_dec, "b h, s h d -> b s d") + self.b_dec

    def per_snapshot(self, f: Tensor) -> Float[Tensor, "batch n_sources d_sae"]:
        """Per-snapshot activations from a code: the per-source code itself, or f_i * n_s[i] (shared gate)."""
        if f.ndim == 3:
            return f
        return f.unsqueeze(-2) * self.decoder_norms().T.to(f.dtype)

    @torch.no_grad()
    def activations_from_pre(self, pre: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch n_sources d_sae"]:
        """Per-snapshot activations from an already summed pre-activation, in inference mode (the probes
        accumulate `pre` one snapshot model at a time)."""
        was = self.training
        self.eval()
        try:
            return self.per_snapshot(self.activate(pre))
        finally:
            self.train(was)

    def forward(self, x: Float[Tensor, "batch n_sources d_in"]) -> tuple[Tensor, Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    # ------------------------------------------------------------------ normalisation, save / load
    @torch.no_grad()
    def fold_norm_scale(self, scale: Float[Tensor, " n_sources"]) -> Crosscoder:
        """Make a model trained on `x * scale` work on raw `x` (in place; returns self).

        pre = sum_s W_enc[s] (x_s scale_s)  ->  W_enc[s] *= scale_s;  x_hat_raw = x_hat / scale  ->
        W_dec[s], b_dec[s] /= scale_s. `norm_scale` accumulates the scales so norms stay comparable."""
        scale = torch.as_tensor(scale, dtype=self.W_enc.dtype, device=self.W_enc.device).reshape(-1)
        if scale.shape != (self.cfg.n_sources,) or not torch.isfinite(scale).all() or (scale <= 0).any():
            raise ValueError(f"norm scale must be {self.cfg.n_sources} positive finite numbers, got {scale.tolist()}")
        self.W_enc.mul_(scale[:, None, None])
        self.W_dec.div_(scale[:, None, None])
        self.b_dec.div_(scale[:, None])
        self.norm_scale.mul_(scale)
        return self

    @torch.no_grad()
    def latents(self, cols: slice) -> Crosscoder:
        """The sub-dictionary of latents `cols` (a copy, on this device): every latent keeps its encoder,
        decoder, bias and threshold, so its activations from `pre[..., cols]` are the full model's. What reads
        a dictionary too wide to hold [tokens, n_sources, d_sae] at once takes it column block by block."""
        idx = range(self.cfg.d_sae)[cols]
        part = Crosscoder(dataclasses.replace(self.cfg, d_sae=len(idx))).to(self.W_dec.device, self.W_dec.dtype)
        by_dim = {"W_enc": 2, "b_enc": 0, "W_dec": 1, "threshold": 0}  # the d_sae axis of each tensor
        part.load_state_dict({k: (v[(slice(None),) * by_dim[k] + (cols,)] if k in by_dim else v).clone()
                              for k, v in self.state_dict().items()})
        return part.train(self.training)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors(path / WEIGHTS_FILE, {k: v.float() for k, v in self.state_dict().items()})
        write_json(path / CFG_FILE, to_dict(self.cfg))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Crosscoder:
        path = Path(path)
        cfg_file, weights_file = path / CFG_FILE, path / WEIGHTS_FILE
        for f in (cfg_file, weights_file):
            if not f.exists():
                raise FileNotFoundError(f"no crosscoder at {path}: {f.name} is missing")
        cfg = from_dict(CrosscoderConfig, json.loads(cfg_file.read_text()))
        # built on the meta device and given the file's tensors (assign): no random initialisation to overwrite
        # and no second copy of the weights (Pythia-160M's 24,576 latents x 32 snapshots: 4.8 GB each)
        with torch.device("meta"):
            model = cls(cfg)
        try:
            state = load_file(str(weights_file))
            model.load_state_dict(state, assign=True)
        except Exception as e:  # safetensors / shape errors: say which file
            raise ValueError(f"cannot load crosscoder weights from {weights_file}: {e}") from e
        if bad := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
            raise ValueError(f"cannot load crosscoder weights from {weights_file}: it lacks {bad}")
        return model.to(device).eval()


@torch.no_grad()
def activations_per_snapshot(model: Crosscoder, x: Float[Tensor, "batch n_sources d_in"]) -> Float[Tensor, "batch n_sources d_sae"]:
    """Activation of each latent in each snapshot (source), the one definition used by probes, top
    contexts, the browser and eval.json (DESIGN.md, "Definitions"):

      per-source gate: the model's own code f[s, i] = act(pre_i n_s[i]) / n_s[i] (Ge et al. 2025);
      shared gate:     f_i * n_s[i], the norm of what latent i writes into source s (f_i is shared, so
                       the snapshot profile comes from the decoder norms, Lindsey et al. 2024).

    n_s[i] = |W_dec[s, i]| in the training (normalised) units (`decoder_norms`). Inference mode: batchtopk
    uses its threshold, so the result does not depend on the batch."""
    model.check_input(x)
    return model.activations_from_pre(model.pre_acts(x))


class InitialCodeWarning(UserWarning):
    """A JumpReLU dictionary whose code on the first batch is empty or dense at initialisation."""


@torch.no_grad()
def check_initial_code(model: Crosscoder, x: Float[Tensor, "batch n_sources d_in"]) -> float:
    """The fraction of JumpReLU latents open per token on the first batch, before any step, with a warning naming
    `[train.crosscoder] jumprelu_init_threshold` when it is 0 (no latent open: only the threshold's straight-through
    window carries gradient and latents that never open stay dead) or above 1/2 (a dense start). The init threshold
    is a fixed number, not a quantile of the data: on 2-snapshot draws of `synthetic.family_config` (d_in 55-222)
    the default 0.1 leaves L0 = 0, where it opens 0.4% of latents on `hard_config`. Other activations: NaN."""
    if model.cfg.activation != "jumprelu":
        return float("nan")
    f = model.encode(x.to(model.W_dec.device, model.W_dec.dtype))
    open_ = f > 0
    frac = (open_.any(1) if f.ndim == 3 else open_).float().mean().item()
    thr = model.cfg.jumprelu_init_threshold
    if frac == 0:
        warnings.warn(f"no JumpReLU latent opens on the first batch at initialisation (L0 = 0): [train.crosscoder] "
                      f"jumprelu_init_threshold = {thr} is above every gate input; lower it", InitialCodeWarning,
                      stacklevel=2)
    elif frac > 0.5:
        warnings.warn(f"{frac:.0%} of JumpReLU latents open per token at initialisation (a dense code): raise "
                      f"[train.crosscoder] jumprelu_init_threshold = {thr}", InitialCodeWarning, stacklevel=2)
    return frac
