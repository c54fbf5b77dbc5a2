"""FP8 training as the report does it (section 3.3, figure 6), emulated exactly on any device.

A linear layer y = x W^T runs three GEMMs per training step; each takes FP8 (E4M3) operands with
fine-grained scales and accumulates in high precision:

| GEMM   | computes          | contraction over | first operand, scaled per        | second operand, scaled per      |
|--------|-------------------|------------------|----------------------------------|---------------------------------|
| Fprop  | y  = x W^T        | in features (K)  | x: 1 x 128 tile (token, 128 ch.) | W: 128 x 128 block              |
| Dgrad  | dx = dy W         | out features (N) | dy: 1 x 128 tile (token, 128 ch.)| W: the same 128 x 128 blocks    |
| Wgrad  | dW = dy^T x       | tokens (M)       | dy: 128 x 1 tile (128 tokens, 1 ch.) | x: 128 x 1 tile             |

so every scale covers a run of 128 numbers *along the contraction*, which is what lets each
block's partial sum be rescaled exactly (the report's "fine-grained quantization"). The master weight
and the optimizer state stay in float32; the weight is quantized in 128 x 128 blocks once per step
(forward and Dgrad share it), and the gradients come out in float32 (weight) and the activation dtype.

All three are `dsv3ref.fp8.tile_matmul`, the GEMM inference uses too: per-row scales on both operands,
one per 128-wide block of the contraction (a 128 x 128 weight block's scale is the per-row scale of
each of its 128 rows). Products are exact (float64 holds a 128-term sum of E4M3 products), block
results are accumulated in float32 (DeepSeek's promotion to CUDA cores every 128 elements) or float64
for float64 inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3ref.fp8 import quantize_activation, quantize_weight, replace_fp8_layers, rows_of_blocks, tile_matmul


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with the three GEMMs of the table above (x (M, K), W (N, K) float32 master weight)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        w_q, w_s = quantize_weight(weight.detach())  # (N, K) E4M3, (Nb, Kb): 128 x 128 blocks
        x_q, x_s = quantize_activation(x.detach())  # (M, K), (M, Kb): 1 x 128 tiles
        ctx.save_for_backward(x, w_q, w_s)
        return tile_matmul(x_q, x_s, w_q, rows_of_blocks(w_s, w_q.shape[0]), accumulate=acc).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w_q, w_s = ctx.saved_tensors
        acc = torch.promote_types(x.dtype, torch.float32)
        # Dgrad: dx (M, K) = dy (M, N) @ W (N, K); contraction over N: dy in 1 x 128 tiles along N,
        # W^T (K, N) with the forward's blocks (transposed), one scale per row of W^T per N block.
        dy_q, dy_s = quantize_activation(dy)
        w_t_scale = rows_of_blocks(w_s.T.contiguous(), w_q.shape[1])  # (K, Nb)
        dx = tile_matmul(dy_q, dy_s, w_q.T.contiguous(), w_t_scale, accumulate=acc).to(x.dtype)
        # Wgrad: dW (N, K) = dy^T (N, M) @ x (M, K); contraction over tokens M: both in 128 x 1 tiles.
        dyt_q, dyt_s = quantize_activation(dy.T.contiguous())  # (N, M), (N, Mb)
        xt_q, xt_s = quantize_activation(x.detach().T.contiguous())  # (K, M), (K, Mb)
        dw = tile_matmul(dyt_q, dyt_s, xt_q, xt_s, accumulate=acc).float()
        return dx, dw


class FP8TrainLinear(nn.Module):
    """A bias-free linear layer trained in FP8: float32 master `weight` (out, in), the GEMMs of
    FP8LinearFunction. Saved under the checkpoint's name `weight`, like the nn.Linear it replaces."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        return FP8LinearFunction.apply(flat, self.weight).reshape(*x.shape[:-1], self.out_features)


def fp8_training_layers(model: nn.Module) -> int:
    """Replace every linear layer the release stores in FP8 (dsv3ref.fp8.FP8_WEIGHT) by an
    FP8TrainLinear with the same weight; returns how many. Embeddings, norms, routers, eh_proj and the
    head stay in float32, as in the report's framework."""
    return replace_fp8_layers(model, lambda layer: FP8TrainLinear(layer.weight))
