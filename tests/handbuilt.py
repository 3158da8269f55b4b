"""A hand-built two-layer attention-only HookedTransformer with a known previous-token head and a
known induction head: the independent reference for the probe scores (issue 4).

The residual stream is split into four named subspaces, each one-hot:

    [ tok (V) | pos (N) | prev (V) | ind (V) ]

- embeddings write the current token into `tok` and the position into `pos`;
- layer 0, head 0 is a **previous-token head**: position p attends to p-1 (query reads `pos`, key reads
  `pos` shifted by one) and copies that token's `tok` into `prev`;
- layer 1, head 0 is an **induction head** by K-composition (Olsson et al. 2022, *In-context Learning
  and Induction Heads*): the query reads the current token from `tok`, the key reads `prev` (written by
  layer 0), so position p attends to every j whose previous token equals the current token, i.e. the
  position right after an earlier occurrence, and copies the token found there into `ind`. Without a
  match it falls back to the BOS position (a weaker constant score), whose value is zero.
- the unembedding reads `ind`, so the model predicts the continuation of a repeated sequence.

Probe "features" are then directions read off these subspaces (`subspace_encoder`): a feature on
`prev[v]` is a previous-token feature, on `ind[v]` an induction feature, on `tok[v]` a current-token
feature. Nothing here is learned, so the expected probe scores are known by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from crosscoders.config import CrosscoderConfig
from crosscoders.model import Crosscoder

BOS = 0
HOOK = "blocks.1.hook_resid_post"


@dataclass(frozen=True)
class Layout:
    d_vocab: int
    n_ctx: int

    @property
    def tok(self) -> int:
        return 0

    @property
    def pos(self) -> int:
        return self.d_vocab

    @property
    def prev(self) -> int:
        return self.d_vocab + self.n_ctx

    @property
    def ind(self) -> int:
        return 2 * self.d_vocab + self.n_ctx

    @property
    def d_model(self) -> int:
        return 3 * self.d_vocab + self.n_ctx


def handbuilt_model(
    d_vocab: int = 12, n_ctx: int = 48, prev_head: bool = True, induction_head: bool = True, sharpness: float = 30.0
) -> HookedTransformer:
    """The hand-built model; `prev_head` / `induction_head` = False zeroes that head (an "early snapshot")."""
    lay = Layout(d_vocab, n_ctx)
    d_head = max(n_ctx, d_vocab + 1)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=lay.d_model, n_ctx=n_ctx, d_head=d_head, n_heads=1, d_vocab=d_vocab,
        attn_only=True, normalization_type=None, positional_embedding_type="standard",
        use_attn_scale=False, act_fn="relu", seed=0, default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    c = sharpness
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        V = torch.arange(d_vocab)
        model.embed.W_E[V, lay.tok + V] = 1.0
        P = torch.arange(n_ctx)
        model.pos_embed.W_pos[P, lay.pos + P] = 1.0
        if prev_head:
            a0 = model.blocks[0].attn
            a0.W_Q[0, lay.pos + P, P] = c  # query at p: direction p
            a0.W_K[0, lay.pos + P[:-1], P[:-1] + 1] = 1.0  # key at j: direction j+1, so p matches j = p-1
            a0.W_V[0, lay.tok + V, V] = 1.0
            a0.W_O[0, V, lay.prev + V] = 1.0
        if induction_head:
            a1 = model.blocks[1].attn
            sink = d_vocab  # an extra head dimension for the BOS fallback
            a1.W_Q[0, lay.tok + V, V] = c
            a1.W_Q[0, lay.tok + V, sink] = c / 2
            a1.W_K[0, lay.prev + V, V] = 1.0  # K-composition: the key is the previous token
            a1.W_K[0, lay.pos + 0, sink] = 1.0
            nb = V[V != BOS]
            a1.W_V[0, lay.tok + nb, nb] = 1.0
            a1.W_O[0, nb, lay.ind + nb] = 1.0
        model.unembed.W_U[lay.ind + V, V] = 1.0
    return model


def subspace_directions(d_vocab: int, n_ctx: int) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Probe directions `W[d_model, d_sae]`: one feature per non-BOS token in `tok`, `prev` and `ind`.

    Returns the matrix and the feature indices of each kind ({"tok": [...], "prev": [...], "ind": [...]}).
    """
    lay = Layout(d_vocab, n_ctx)
    toks = [v for v in range(d_vocab) if v != BOS]
    W = torch.zeros(lay.d_model, 3 * len(toks))
    kinds: dict[str, list[int]] = {}
    for k, (name, off) in enumerate([("tok", lay.tok), ("prev", lay.prev), ("ind", lay.ind)]):
        idx = [k * len(toks) + i for i in range(len(toks))]
        W[[off + v for v in toks], idx] = 1.0
        kinds[name] = idx
    return W, kinds


def subspace_crosscoder(W: torch.Tensor, dec_norms: torch.Tensor | None = None, threshold: float = 0.5) -> Crosscoder:
    """A real `Crosscoder` (relu, shared gate) whose encoder reads the directions `W[d_model, d_sae]` in the
    last source (the others' encoders are zero, so the shared code is the last snapshot's reading).

    `b_enc = -threshold` so that attention leakage (~e^-sharpness) and split attention do not count as
    firing; `dec_norms[d_sae, n_sources]` (default ones, one source) sets the decoder norm profiles, i.e.
    each feature's peak snapshot and its per-snapshot activation f_i * norm (zero norm: absent there).
    """
    d_model, d_sae = W.shape
    dec_norms = torch.ones(d_sae, 1) if dec_norms is None else dec_norms
    n_sources = dec_norms.shape[1]
    cc = Crosscoder(CrosscoderConfig(n_sources=n_sources, d_in=d_model, d_sae=d_sae, activation="relu"))
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[-1] = W
        cc.b_enc.fill_(-threshold)
        cc.W_dec.copy_(W.T[None] * dec_norms.T[:, :, None])
        cc.b_dec.zero_()
    return cc.eval()


def random_stream(n_seq: int = 64, seq_len: int = 40, vocab: int = 16, seed: int = 0) -> torch.Tensor:
    """Uniform random tokens 1..vocab-1 with BOS at position 0 (the probe tests' token stream)."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, vocab, (n_seq, seq_len), generator=g)
    toks[:, 0] = BOS
    return toks
