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
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dsv3ref.block import DecoderLayer
from dsv3ref.config import ModelConfig
from dsv3ref.impl import Implementation
from dsv3ref.linear import Linear
from dsv3ref.norm import RMSNorm

DEFAULT_MTP_LAMBDA = 0.3


class SharedHead(nn.Module):
    """`shared_head.norm`: the MTP module's own final norm (the head itself is the main model's)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """MTP module k: enorm, hnorm, eh_proj, one decoder layer (inherited), shared_head.norm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, impl: Implementation | None = None):
        super().__init__(cfg, layer_idx, impl)
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d, bias=False)
        self.shared_head = SharedHead(cfg)

    def combine(self, hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Eq. 21 in the weights' order: hidden h^{k-1} (b, t, d), embeddings of t_{i+k} (b, t, d) -> (b, t, d)."""
        return self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(hidden)], dim=-1))

    def forward(self, hidden, token_embeds, cos, sin, mask, positions=None, cache=None) -> torch.Tensor:
        """h^{k-1} and Emb(t_{i+k}), both (b, t, d) -> h^k (b, t, d); attention arguments as `MLA.forward`."""
        return super().forward(self.combine(hidden, token_embeds), cos, sin, mask, positions, cache)


def mtp_chain(model, h0: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The D modules run in sequence over a whole sequence, as in training (no cache).

    h0 (b, T, d): the main model's final-norm hidden states; input_ids (b, T). Module k runs at
    positions i = 0 .. T-1-k (those with a token t_{i+k}), fed h^{k-1}_i and Emb(t_{i+k}).
    Returns [h^1 (b, T-1, d), h^2 (b, T-2, d), ...]; h^k_i predicts token t_{i+k+1}.
    """
    t = input_ids.shape[1]
    hidden, out = h0, []
    for k in range(1, len(model.mtp_layers) + 1):
        hidden = model.mtp_hidden_states(k, hidden[:, : t - k], input_ids[:, k:])
        out.append(hidden)
    return out


def mtp_loss(model, h0: torch.Tensor, input_ids: torch.Tensor, mtp_lambda: float = DEFAULT_MTP_LAMBDA
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 24-25: L^k = cross-entropy of module k's prediction at position i against t_{i+k+1}, and
    L_MTP = lambda / D * sum_k L^k. h0 (b, T, d), input_ids (b, T) -> (L_MTP, (D,) per-depth losses);
    a model without MTP modules gives (0, empty)."""
    per_depth = []
    for k, hidden in enumerate(mtp_chain(model, h0, input_ids), 1):
        n = input_ids.shape[1] - 1 - k  # positions whose target t_{i+k+1} exists
        logits = model.mtp_logits(k, hidden[:, :n])  # (b, n, vocab)
        per_depth.append(F.cross_entropy(rearrange(logits, "b t v -> (b t) v"),
                                         rearrange(input_ids[:, k + 1:k + 1 + n], "b t -> (b t)").long()))
    if not per_depth:
        return h0.new_zeros(()), h0.new_zeros(0)
    per_depth = torch.stack(per_depth)
    return mtp_lambda * per_depth.mean(), per_depth


def mtp_parameter_count(cfg: ModelConfig) -> int:
    """Unique parameters of the config's MTP modules (enorm, hnorm, eh_proj, a decoder layer,
    shared_head.norm each; the embedding and head are the main model's), counted on the meta device."""
    if not cfg.num_nextn_predict_layers:
        return 0
    with torch.device("meta"):
        layer = MTPLayer(cfg, cfg.num_hidden_layers)
    return cfg.num_nextn_predict_layers * sum(p.numel() for p in layer.parameters())


def checkpoint_copies(cfg: ModelConfig) -> dict[str, str]:
    """Checkpoint names of the MTP modules' copies of the embedding and head -> the main tensor.

    The published layout stores them (`model.layers.61.embed_tokens.weight`,
    `model.layers.61.shared_head.head.weight`); dsv3ref shares the main ones, as the report does,
    writes the copies on save and checks them equal on load.
    """
    copies = {}
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        copies[prefix + "embed_tokens.weight"] = "model.embed_tokens.weight"
        copies[prefix + "shared_head.head.weight"] = ("model.embed_tokens.weight" if cfg.tie_word_embeddings
                                                     else "lm_head.weight")
    return copies
