"""sae-lens interop: one source's slice of a crosscoder as a sae-lens SAE (sae-lens 6.54 on-disk format).

The slice of source s encodes with W_enc[s] + b_enc and decodes with W_dec[s] + b_dec[s], so it gives
`Crosscoder.encode_per_source(x)[:, s]` and that code's reconstruction of source s; for a one-source
crosscoder that is exactly the crosscoder. Schemes map to sae-lens architectures:
  relu              -> "standard"  (relu(x W_enc + b_enc))
  jumprelu, batchtopk -> "jumprelu" (the crosscoder's gate pre * N_i > theta_i is pre > theta_i / N_i;
                        batchtopk exports its inference threshold, as sae-lens saves BatchTopK SAEs)
Our encoder does not subtract b_dec from the input (Lindsey et al. 2024), hence apply_b_dec_to_input=False.
"""

from __future__ import annotations

from pathlib import Path

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
    model: Crosscoder, source: int = 0, hook_name: str | None = None, model_name: str | None = None
) -> SAE:
    """An in-memory sae-lens SAE equal to source `source`'s slice of `model`."""
    S = model.cfg.n_sources
    if not 0 <= source < S:
        raise ValueError(f"source must be in 0..{S - 1}, got {source}")
    meta = SAEMetadata(hook_name=hook_name, model_name=model_name)
    common = dict(d_in=model.cfg.d_in, d_sae=model.cfg.d_sae, dtype="float32", device="cpu",
                  apply_b_dec_to_input=False, normalize_activations="none", metadata=meta)
    state = {
        "W_enc": model.W_enc[source].detach().float().cpu().clone(),
        "b_enc": model.b_enc.detach().float().cpu().clone(),
        "W_dec": model.W_dec[source].detach().float().cpu().clone(),
        "b_dec": model.b_dec[source].detach().float().cpu().clone(),
    }
    if model.cfg.activation == "relu":
        sae: SAE = StandardSAE(StandardSAEConfig(**common))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
        norm = model.decoder_norms().sum(-1).float().cpu()
        theta = model.threshold.detach().float().cpu().clamp(min=0)
        # A latent with zero decoder norm never opens its gate: give it an unreachable threshold.
        state["threshold"] = torch.where(norm > 0, theta / norm.clamp(min=1e-30), torch.full_like(theta, float("inf")))
    sae.load_state_dict(state)
    return sae.eval()


def export_sae_lens(
    model: Crosscoder,
    path: str | Path,
    source: int = 0,
    hook_name: str | None = None,
    model_name: str | None = None,
) -> Path:
    """Write source `source`'s slice as `cfg.json` + `sae_weights.safetensors` (atomically), loadable with
    `sae_lens.SAE.load_from_disk(path)`."""
    sae = to_sae_lens(model, source, hook_name, model_name)
    path = Path(path)
    save_safetensors(path / SAE_WEIGHTS_FILENAME, dict(sae.state_dict()))
    write_json(path / SAE_CFG_FILENAME, sae.cfg.to_dict())
    return path
