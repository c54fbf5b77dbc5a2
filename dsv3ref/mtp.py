"""Multi-Token Prediction (DeepSeek-V3 report, section 2.2, eqs. 21-25).

Besides the next token, DeepSeek-V3 learns to predict the tokens after it with D extra modules
(D = 1 in the release, stored as `model.layers.61`). Module k turns the representation h_i^{k-1}
of position i (h^0: the main model's) and the embedding of token t_{i+k} into h_i^k, which
predicts token t_{i+k+1}:

    h'_i^k = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1})])       (eq. 21, see the note on order)
    h_i^k  = TRM_k(h'_i^k)                                            (eq. 22: one decoder layer)
    P_{i+k+1}^k = softmax(head(shared_head.norm(h_i^k)))              (eq. 23)

Order of the concatenation: eq. 21 writes the hidden state first, but the published weights expect
the *embedding first*: `eh_proj` (hidden x 2*hidden) multiplies [enorm(embedding) ; hnorm(hidden)],
as every serving engine that runs these weights does. dsv3ref follows the weights.

Which h^0: the main model's hidden state after its final norm (the vector its LM head reads), as the
serving engines feed it; within module k the positions are those of h_i (RoPE position i).
Embedding and output head are the main model's (the report shares them); checkpoints that store
copies (`model.layers.61.embed_tokens.weight`, `...shared_head.head.weight`) are checked to be equal.

Training objective (eqs. 24-25): L^k = cross-entropy of P^k against t_{i+k+1};
L_MTP = lambda / D * sum_k L^k, added to the main loss (lambda = 0.3, later 0.1, in the report).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3ref.block import DecoderLayer
from dsv3ref.config import ModelConfig
from dsv3ref.norm import RMSNorm

DEFAULT_MTP_LAMBDA = 0.3


class SharedHead(nn.Module):
    """`shared_head.norm`: the MTP module's own final norm (the head itself is the main model's)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """MTP module k: enorm, hnorm, eh_proj, one decoder layer (inherited), shared_head.norm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, attn_impl: str = "naive", moe_impl: str = "loop"):
        super().__init__(cfg, layer_idx, attn_impl, moe_impl)
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.shared_head = SharedHead(cfg)

    def combine(self, hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Eq. 21 in the weights' order: hidden h^{k-1} (b, t, d), embeddings of t_{i+k} (b, t, d) -> (b, t, d)."""
        return self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(hidden)], dim=-1))

    def forward(self, hidden, token_embeds, cos, sin, mask, positions=None, cache=None) -> torch.Tensor:
        """h^{k-1} and Emb(t_{i+k}), both (b, t, d) -> h^k (b, t, d); attention arguments as `MLA.forward`."""
        return super().forward(self.combine(hidden, token_embeds), cos, sin, mask, positions, cache)
