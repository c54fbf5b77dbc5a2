"""SwiGLU feed-forward network: the dense MLP, each routed expert and the shared experts."""

import torch
import torch.nn.functional as F
from torch import nn

from dsv3ref.linear import Linear


class MLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)). Shapes: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, bias=False)
        self.up_proj = Linear(dim, inter_dim, bias=False)
        self.down_proj = Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
