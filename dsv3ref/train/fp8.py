"""FP8 training as the report does it (section 3.3, figure 6), emulated on any device.

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
(every forward of the step and every Dgrad share it), an activation is quantized once per forward
however many layers read it (ActivationTiles: an MLP's gate_proj and up_proj share x) and kept for the
backward pass in FP8 (its 1 x 128 tiles), and the gradients come out in float32 (weight) and the
activation dtype.

All three are `dsv3ref.fp8.tile_matmul`, the GEMM inference uses too: per-row scales on both operands,
one per 128-wide block of the contraction (a 128 x 128 weight block's scale is the per-row scale of
each of its 128 rows). Products are exact (float64 holds a 128-term sum of E4M3 products), block
results are accumulated in float32 (DeepSeek's promotion to CUDA cores every 128 elements) or float64
for float64 inputs: fp8_kernel "emulate", the default and the oracle. fp8_kernel "dequantize" runs
the same quantizations and multiplies their dequantized values in one float32 (float64) GEMM each,
as `dsv3ref.fp8.fp8_matmul_dequantized` does for inference: float32 rounding apart, the same step
(tested), in about 1.8x the float32 step's time where "emulate" takes 2.6x on a CPU, whose float64
GEMMs alone take 1.7x (benchmarks/train_step.py).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3ref.fp8 import (
    decode_e4m3,
    dequantize_columns,
    dequantize_tiles,
    dequantize_weight_fast,
    quantize_activation,
    quantize_columns,
    quantize_weight,
    quantize_weight_fast,
    replace_fp8_layers,
    rows_of_blocks,
    tile_matmul_decoded,
)
from dsv3ref.impl import check_choice
from dsv3ref.memo import derived

TRAINING_KERNELS = ("emulate", "dequantize")
"""The fp8_kernel values FP8 training runs (dsv3ref.impl's vocabulary); "scaled_mm" is inference's."""


def training_kernel(kernel: str) -> str:
    """kernel, checked: one of the vocabulary's fp8_kernel values, and one FP8 training runs."""
    check_choice("fp8_kernel", kernel)
    if kernel not in TRAINING_KERNELS:
        raise ValueError(f"fp8_kernel: found {kernel!r}, FP8 training runs one of {TRAINING_KERNELS} "
                         "(torch's scaled_mm is inference's kernel here)")
    return kernel


class ActivationTiles:
    """One activation's FP8 form, shared by every FP8 layer that reads it (an MLP's gate_proj and up_proj,
    attention's q_a_proj and kv_a_proj_with_mqa): its tiles are quantized once per forward, as the
    report's framework caches them, not once per layer that reads them.

    q, scale: x (M, K) in 1 x 128 tiles, (M, K) E4M3 and (M, Kb) float32 (Fprop's operand, kept for the
    backward pass). `columns()`: Wgrad's operand, the same values dequantized, transposed and quantized
    again in 128 x 1 tiles (the report, section 3.5.2), made by the first backward pass that needs it and
    dropped when every reader's backward pass has run (`readers` counts them)."""

    def __init__(self, x: torch.Tensor):
        self.q, self.scale = quantize_activation(x)  # (M, K), (M, Kb): 1 x 128 tiles
        self.readers = 0
        self._columns = None  # Wgrad's operand, see columns()

    def columns(self, kernel: str, dtype: torch.dtype):
        """x (M, K) in 128 x 1 tiles as Wgrad's `kernel` reads it: for "emulate", the E4M3 values decoded
        to float64 (exact) and their scales (Mb, K); for "dequantize", the values times their scales
        (M, K) in dtype."""
        if self._columns is None or self._columns[0] != (kernel, dtype):
            x_q, x_s = quantize_columns(dequantize_tiles(self.q, self.scale))  # (M, K), (Mb, K)
            self._columns = (kernel, dtype), (dequantize_columns(x_q, x_s, dtype=dtype) if kernel == "dequantize"
                                              else (decode_e4m3(x_q, torch.float64), x_s))
        return self._columns[1]

    def read(self) -> None:
        """A reader's backward pass has used `columns()` (dropped after the last reader)."""
        self.readers -= 1
        if self.readers <= 0:
            self._columns = None


def activation_tiles(x: torch.Tensor) -> ActivationTiles:
    """x (..., K)'s ActivationTiles of its (tokens, K) rows, made once per value x takes
    (dsv3ref.memo.derived: the same tensor object, unchanged in place) and shared by its readers."""
    return derived(x, "fp8 tiles", lambda: ActivationTiles(x.detach().reshape(-1, x.shape[-1])))


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with the three GEMMs of the table above (x (M, K), W (N, K) float32 master weight).

    weight_q: W quantized in 128 x 128 blocks, (E4M3 (N, K), scales (Nb, Kb)), when the caller has it
    (FP8TrainLinear quantizes once per optimizer step); None quantizes it here. tiles: x's
    ActivationTiles when the caller shares them between layers (FP8TrainLinear); None quantizes x here.
    kernel: how each GEMM multiplies its quantized operands (dsv3ref.impl's fp8_kernel): "emulate",
    `tile_matmul`'s exact 128-term blocks accumulated in float32 (the oracle), or "dequantize", the same
    operands dequantized and multiplied in one GEMM of the accumulation dtype (`fp8_matmul_dequantized`:
    float32 rounding apart, the same result at the speed of a float32 GEMM)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,
                weight_q: tuple[torch.Tensor, torch.Tensor] | None = None,
                tiles: ActivationTiles | None = None, kernel: str = "emulate") -> torch.Tensor:
        training_kernel(kernel)
        acc = torch.promote_types(x.dtype, torch.float32)
        w_q, w_s = weight_q if weight_q is not None else quantize_weight(weight.detach())  # 128 x 128 blocks
        tiles = tiles if tiles is not None else ActivationTiles(x.detach())  # (M, K) in 1 x 128 tiles
        tiles.readers += 1
        ctx.tiles = tiles  # the activation kept in FP8, as the report caches it
        ctx.x_dtype, ctx.kernel = x.dtype, kernel
        # The weight's form for the GEMMs, kept with its E4M3 blocks (made once per blocks: once per
        # optimizer step when FP8TrainLinear keeps them, not once per micro-batch); Fprop and Dgrad share it.
        if kernel == "dequantize":
            w = derived(w_q, ("dense", acc), lambda: dequantize_weight_fast(w_q, w_s, dtype=acc))  # (N, K)
            ctx.save_for_backward(w)
            return (dequantize_tiles(tiles.q, tiles.scale, dtype=acc) @ w.T).to(x.dtype)  # (M, K) @ (K, N)
        w64 = derived(w_q, "float64", lambda: decode_e4m3(w_q, torch.float64))  # (N, K): E4M3 values, exact
        ctx.save_for_backward(w64, w_s)
        y = tile_matmul_decoded(decode_e4m3(tiles.q, torch.float64), tiles.scale, w64,
                                rows_of_blocks(w_s, w_q.shape[0]), accumulate=acc)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        acc = torch.promote_types(ctx.x_dtype, torch.float32)
        # Dgrad: dx (M, K) = dy (M, N) @ W (N, K); contraction over N: dy in 1 x 128 tiles along N,
        # W^T (K, N) with the forward's blocks (transposed), one scale per row of W^T per N block.
        dy_q, dy_s = quantize_activation(dy)
        # Wgrad: dW (N, K) = dy^T (N, M) @ x (M, K); contraction over tokens M: both in 128 x 1 tiles. x
        # is the forward's FP8 copy, dequantized, transposed and quantized again in 128 x 1 tiles (the
        # report, section 3.5.2: "read out, dequantized, transposed, re-quantized into 128x1 tiles"), once
        # for all the layers that read it. Both are quantized along their columns where they lie
        # (quantize_columns: the transposed copy's numbers) and the GEMM reads them transposed.
        dy_cq, dy_cs = quantize_columns(dy)  # (M, N), (Mb, N)
        x_columns = ctx.tiles.columns(ctx.kernel, acc)
        ctx.tiles.read()
        if ctx.kernel == "dequantize":
            w, = ctx.saved_tensors
            dx = dequantize_tiles(dy_q, dy_s, dtype=acc) @ w  # (M, N) @ (N, K)
            dw = dequantize_columns(dy_cq, dy_cs, dtype=acc).T @ x_columns  # (N, M) @ (M, K)
        else:
            w64, w_s = ctx.saved_tensors
            w_t_scale = rows_of_blocks(w_s.T.contiguous(), w64.shape[1])  # (K, Nb)
            dx = tile_matmul_decoded(decode_e4m3(dy_q, torch.float64), dy_s, w64.T, w_t_scale, accumulate=acc)
            x64, x_cs = x_columns  # (M, K), (Mb, K)
            dw = tile_matmul_decoded(decode_e4m3(dy_cq, torch.float64).T, dy_cs.T, x64.T, x_cs.T, accumulate=acc)
        return dx.to(ctx.x_dtype), dw.float(), None, None, None


class FP8TrainLinear(nn.Module):
    """A bias-free linear layer trained in FP8: float32 master `weight` (out, in), the GEMMs of
    FP8LinearFunction. Saved under the checkpoint's name `weight`, like the nn.Linear it replaces.

    The weight is quantized once per value it takes (once per optimizer step): every call until the
    weight changes in place (its version counter moves) or is replaced reuses the same E4M3 blocks,
    so micro-batches of one step (gradient accumulation, a pipeline's micro-batches) share them, and
    the form the GEMMs read (decoded to float64, or dequantized), kept with the blocks."""

    def __init__(self, weight: torch.Tensor, kernel: str = "emulate"):
        super().__init__()
        self.kernel = training_kernel(kernel)
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.quantizations = 0  # how many times the weight was quantized (tests count them)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 kernel={self.kernel}"

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E4M3 weight, 128 x 128 block scales) of the weight's current value."""
        return derived(self.weight, "fp8 blocks", self._quantize)

    def _quantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.quantizations += 1
        return quantize_weight_fast(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        y = FP8LinearFunction.apply(flat, self.weight, self.quantized_weight(), activation_tiles(x), self.kernel)
        return y.reshape(*x.shape[:-1], self.out_features)


def fp8_training_layers(model: nn.Module, kernel: str = "emulate") -> int:
    """Replace every linear layer the release stores in FP8 (dsv3ref.fp8.FP8_WEIGHT) by an
    FP8TrainLinear with the same weight, its GEMMs run by `kernel`; returns how many. Embeddings, norms,
    routers, eh_proj and the head stay in float32, as in the report's framework."""
    training_kernel(kernel)
    return replace_fp8_layers(model, lambda layer: FP8TrainLinear(layer.weight, kernel))
