"""Parameter counts of a configuration, computed on the meta device (no memory is allocated)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3ref.block import DecoderLayer
from dsv3ref.config import ModelConfig
from dsv3ref.mlp import MLP
from dsv3ref.mtp import mtp_parameter_count
from dsv3ref.norm import RMSNorm


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of the main model (the MTP module is counted apart, in `mtp`)."""

    total: int
    """Every parameter of the main model: embedding, decoder layers, final norm, LM head."""
    activated: int
    """Parameters one token passes through: `total` minus the routed experts it does not choose
    (the embedding and head are counted whole, as the report does for its 37B)."""
    embedding: int
    head: int
    """LM head (0 when tied to the embedding)."""
    per_layer: tuple[int, ...]
    """Parameters of each decoder layer, router bias included."""
    routed_expert: int
    """Parameters of one routed expert."""
    mtp: int
    """Unique parameters of the MTP modules (embedding and head are shared with the main model)."""


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Count the parameters of `cfg` by building its modules on the meta device.

    Trainable parameters only: the router bias `e_score_correction_bias` is a buffer set by the
    balancing rule, not by gradient descent, and is left out as in the published count. Every
    dense layer has the same shapes, and so has every MoE layer, so one of each is built.
    """
    with torch.device("meta"):
        layer_size: dict[bool, int] = {}  # is_moe -> parameters of such a layer
        for i in range(cfg.num_hidden_layers):
            if cfg.is_moe_layer(i) not in layer_size:
                layer_size[cfg.is_moe_layer(i)] = _numel(DecoderLayer(cfg, i))
        expert = MLP(cfg.hidden_size, cfg.moe_intermediate_size)
        final_norm = RMSNorm(cfg.hidden_size)
    per_layer = tuple(layer_size[cfg.is_moe_layer(i)] for i in range(cfg.num_hidden_layers))
    embedding = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    total = embedding + sum(per_layer) + _numel(final_norm) + head
    routed_expert = _numel(expert)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    idle = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * routed_expert
    return ParameterCount(total=total, activated=total - idle, embedding=embedding, head=head,
                          per_layer=per_layer, routed_expert=routed_expert, mtp=mtp_parameter_count(cfg))
