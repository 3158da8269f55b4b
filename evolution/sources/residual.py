"""The residual stream of a Hugging Face causal LM, read with hooks on its decoder layers: the input of
block 0 and the output of every block. HF's `hidden_states[-1]` is after the final norm in some
architectures, so it is not used. One reader for the geometry, the logit lens and the regulariser."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks of a Hugging Face model (llama: model.layers, neox: layers)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return mod
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def hf_residual(model: torch.nn.Module, tokens: Int[Tensor, "b s"]) -> tuple[Any, list[Float[Tensor, "b s d"]]]:
    """(the model's output, [input of block 0, output of block 0, ..., output of the last block]) from one
    forward pass; gradients flow when the caller allows them."""
    layers = decoder_layers(model)
    acts: list[Tensor] = []

    def pre(_mod, args, kwargs):
        acts.append(args[0] if args else kwargs["hidden_states"])

    def post(_mod, _args, out):
        acts.append(out[0] if isinstance(out, tuple) else out)

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [layer.register_forward_hook(post) for layer in layers]
    try:
        out = model(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    return out, acts
