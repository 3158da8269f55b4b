"""sae-lens interop: source s of a crosscoder as a sae-lens SAE (sae-lens 6.54 on-disk format).

The crosscoder's pre-activation is shared, sum_s W_enc[s] x_s + b_enc, so an SAE that reads one snapshot
alone cannot give the crosscoder's codes. Two exports, chosen by `reads`:
  "all_sources" (exact): the SAE reads the sources concatenated, x.reshape(batch, n_sources * d_in), encodes
      with W_enc reshaped to [n_sources * d_in, d_sae] and writes only source s's block (W_dec[s], b_dec[s];
      the other blocks are zero). `sae.encode` equals the model's code for source s (the shared code, or
      f[:, s] for the per-source gate) and the s-th block of `sae(x)` equals x_hat_s, exactly (tested).
  "own_source": the SAE reads source s alone (W_enc[s] + b_enc, d_in wide), so it hooks into that
      snapshot's model; its code is the crosscoder's with the other sources' inputs set to zero.
For a one-source crosscoder both are exactly the crosscoder. Schemes map to sae-lens architectures:
  relu, shared gate  -> "standard" (relu(x W_enc + b_enc))
  jumprelu, batchtopk, and every per-source gate -> "jumprelu": the crosscoder's gate pre * N_i > theta_i is
      pre > theta_i / N_i, with N_i = sum_s |W_dec[s,i]| (shared) or |W_dec[s,i]| (per-source; per-source relu
      is theta = 0); batchtopk exports its inference threshold, as sae-lens saves BatchTopK SAEs.
Our encoder does not subtract b_dec from the input (Lindsey et al. 2024), hence apply_b_dec_to_input=False.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from .io import save_safetensors, write_json
from .model import Crosscoder


@torch.no_grad()
def to_sae_lens(
    model: Crosscoder,
    source: int = 0,
    hook_name: str | None = None,
    model_name: str | None = None,
    reads: Literal["all_sources", "own_source"] = "all_sources",
) -> SAE:
    """An in-memory sae-lens SAE equal to source `source` of `model` (see the module docstring for `reads`)."""
    S, D, H = model.cfg.n_sources, model.cfg.d_in, model.cfg.d_sae
    if not 0 <= source < S:
        raise ValueError(f"source must be in 0..{S - 1}, got {source}")
    if reads not in ("all_sources", "own_source"):
        raise ValueError(f"reads must be 'all_sources' or 'own_source', got {reads!r}")

    def get(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu().clone()

    if reads == "all_sources":
        W_enc = get(model.W_enc).reshape(S * D, H)  # row s * D + d: source-major, as x.reshape(b, S * D)
        W_dec, b_dec = torch.zeros(H, S * D), torch.zeros(S * D)
        W_dec[:, source * D : (source + 1) * D] = get(model.W_dec[source])
        b_dec[source * D : (source + 1) * D] = get(model.b_dec[source])
        d_in = S * D
    else:
        W_enc, W_dec, b_dec, d_in = get(model.W_enc[source]), get(model.W_dec[source]), get(model.b_dec[source]), D
    meta = SAEMetadata(hook_name=hook_name, model_name=model_name)
    common = dict(d_in=d_in, d_sae=H, dtype="float32", device="cpu",
                  apply_b_dec_to_input=False, normalize_activations="none", metadata=meta)
    state = {"W_enc": W_enc, "b_enc": get(model.b_enc), "W_dec": W_dec, "b_dec": b_dec}
    if model.cfg.activation == "relu" and not model.per_source:
        sae: SAE = StandardSAE(StandardSAEConfig(**common))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
        norm = model.gate_norms().float().cpu()
        norm = norm[source] if model.per_source else norm
        theta = get(model.threshold).clamp(min=0)
        if model.cfg.activation == "relu":
            theta = torch.zeros_like(theta)
        # A latent with zero gate norm never opens its gate: give it an unreachable threshold.
        state["threshold"] = torch.where(norm > 0, theta / norm.clamp(min=1e-30), torch.full_like(theta, float("inf")))
    sae.load_state_dict(state)
    return sae.eval()


def export_sae_lens(
    model: Crosscoder,
    path: str | Path,
    source: int = 0,
    hook_name: str | None = None,
    model_name: str | None = None,
    reads: Literal["all_sources", "own_source"] = "all_sources",
) -> Path:
    """Write source `source`'s slice as `cfg.json` + `sae_weights.safetensors` (atomically), loadable with
    `sae_lens.SAE.load_from_disk(path)`."""
    sae = to_sae_lens(model, source, hook_name, model_name, reads)
    path = Path(path)
    save_safetensors(path / SAE_WEIGHTS_FILENAME, dict(sae.state_dict()))
    write_json(path / SAE_CFG_FILENAME, sae.cfg.to_dict())
    return path
