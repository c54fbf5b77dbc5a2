"""One decoder layer: pre-norm attention and pre-norm feed-forward, each added to the residual."""

from __future__ import annotations

import torch
from torch import nn

from dsv3ref.config import ModelConfig
from dsv3ref.impl import Implementation
from dsv3ref.mla import MLA
from dsv3ref.mlp import MLP
from dsv3ref.moe import MoE
from dsv3ref.norm import RMSNorm


class DecoderLayer(nn.Module):
    """h = x + MLA(norm(x)); out = h + FFN(norm(h)), FFN dense for the first layers and MoE after."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, impl: Implementation | None = None):
        super().__init__()
        impl = impl or Implementation()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, impl.attn_impl, impl.attn_order)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (MoE(cfg, impl.moe_impl) if cfg.is_moe_layer(layer_idx)
                    else MLP(cfg.hidden_size, cfg.intermediate_size))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                positions: torch.Tensor | None = None, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x (b, t, dim) -> (b, t, dim); the other arguments as for `MLA.forward`."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, positions, cache)
        return h + self.mlp(self.post_attention_layernorm(h))
