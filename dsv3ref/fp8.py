"""Fine-grained FP8 as DeepSeek-V3 uses it (report, section 3.3), computed exactly on a CPU.

E4M3 (`torch.float8_e4m3fn`): 1 sign, 4 exponent, 3 mantissa bits; largest value 448, no infinity.
Its 3 mantissa bits leave a relative rounding error of at most 2^-4 (half an ulp).

- Weights are quantized in 128 x 128 blocks (`weight_block_size`), one float32 scale per block,
  stored as `weight_scale_inv` of shape (ceil(out / 128), ceil(in / 128)): dequantized weight =
  fp8 value * weight_scale_inv of its block. Blocks at the edges are zero-padded for the scale and
  cropped after.
- Activations are quantized online per token and per 128 channels (1 x 128 tiles):
  scale = max(|x| over the tile, 1e-4) / 448, x_fp8 = x / scale. DeepSeek-V3.1 configs ask for
  `scale_fmt: "ue8m0"`: the scale rounded up to a power of two (an 8-bit exponent, no mantissa).
- The GEMM multiplies FP8 operands per 128-wide K block, scales each block's partial sum by both
  block scales and accumulates in float32. `fp8_matmul` computes the FP8 products exactly (in
  float64, where a 128-term sum of E4M3 products is exact) and accumulates the scaled blocks in
  float32.
- Tensor cores accumulate FP8 products with about 14 mantissa bits; the report measures up to ~2%
  error at K = 4096 and fixes it by promoting partial sums to float32 every N_C = 128 elements.
  `limited_precision_dot` reproduces that experiment.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-4


def _pad_to(x: torch.Tensor, dims: tuple[int, ...], block: int) -> torch.Tensor:
    """Zero-pad the given trailing dims of x up to multiples of block."""
    pad = []
    for d in reversed(range(x.dim())):
        pad += [0, (-x.shape[d]) % block if d in dims else 0]
    return F.pad(x, pad)


def _ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive scales up to a power of two (never smaller, so x / scale stays within 448)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def quantize_weight(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> fp8 weight (out, in) and weight_scale_inv (ceil(out/block), ceil(in/block)) float32."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: expected a 2-D weight, found shape {tuple(w.shape)}")
    out_dim, in_dim = w.shape
    blocks = rearrange(_pad_to(w.float(), (0, 1), block), "(bo o) (bi i) -> bo bi o i", o=block, i=block)
    amax = blocks.abs().amax(dim=(-1, -2)).clamp(min=AMAX_FLOOR)  # (bo, bi)
    scale = amax / E4M3_MAX
    if scale_fmt == "ue8m0":
        scale = _ue8m0(scale)
    q = (blocks / scale[..., None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    q = rearrange(q, "bo bi o i -> (bo o) (bi i)")[:out_dim, :in_dim]
    return q.contiguous(), scale.contiguous()


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The published rule: each block of the fp8 weight times its weight_scale_inv; padded, then cropped."""
    out_dim, in_dim = q.shape
    expected = (math.ceil(out_dim / block), math.ceil(in_dim / block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv: expected shape {expected} for a weight of shape {tuple(q.shape)}, "
                         f"found {tuple(scale_inv.shape)}")
    blocks = rearrange(_pad_to(q.float(), (0, 1), block), "(bo o) (bi i) -> bo bi o i", o=block, i=block)
    w = rearrange(blocks * scale_inv.float()[..., None, None], "bo bi o i -> (bo o) (bi i)")
    return w[:out_dim, :in_dim].to(dtype)


def quantize_activation(x: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> fp8 x (..., K) and scales (..., ceil(K/block)) float32, one per token per tile."""
    k = x.shape[-1]
    tiles = rearrange(_pad_to(x.float(), (x.dim() - 1,), block), "... (t c) -> ... t c", c=block)
    scale = tiles.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / E4M3_MAX  # (..., tiles)
    if scale_fmt == "ue8m0":
        scale = _ue8m0(scale)
    q = (tiles / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return rearrange(q, "... t c -> ... (t c)")[..., :k].contiguous(), scale


def fp8_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale_inv: torch.Tensor,
               block: int = BLOCK) -> torch.Tensor:
    """The block-scaled FP8 GEMM y = x @ w.T, emulated exactly.

    x_q (M, K) fp8 with x_scale (M, Kb); w_q (N, K) fp8 with w_scale_inv (Nb, Kb). For each K block
    b: the partial sum of FP8 products, exact (float64 holds a 128-term sum of E4M3 products
    exactly), times x_scale[:, b] and w_scale_inv[n // block, b]; the blocks are accumulated in
    float32 in order. Returns (M, N) float32.
    """
    m, k = x_q.shape
    n = w_q.shape[0]
    xb = rearrange(_pad_to(x_q.double(), (1,), block), "m (kb c) -> kb m c", c=block)
    wb = rearrange(_pad_to(w_q.double(), (1,), block), "n (kb c) -> kb n c", c=block)
    partial = torch.einsum("bmc,bnc->bmn", xb, wb)  # (kb, m, n), exact
    w_rows = w_scale_inv.double().repeat_interleave(block, dim=0)[:n]  # (n, kb): each row's block scale
    scaled = partial * rearrange(x_scale.double(), "m kb -> kb m 1") * rearrange(w_rows, "n kb -> kb 1 n")
    acc = torch.zeros(m, n, dtype=torch.float32, device=x_q.device)
    for block_sum in scaled:
        acc = acc + block_sum.float()
    return acc


class FP8Linear(nn.Module):
    """A bias-free linear layer whose weight is stored in FP8 with 128 x 128 block scales.

    Checkpoint names: `weight` (float8_e4m3fn, (out, in)) and `weight_scale_inv` (float32). The
    input is quantized per token per 128 channels on the fly (activation_scheme "dynamic") and
    multiplied with `fp8_matmul`; the result is cast to the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, scale_fmt: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scale_fmt = in_features, out_features, scale_fmt
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=E4M3))
        self.register_buffer("weight_scale_inv", torch.ones(math.ceil(out_features / BLOCK),
                                                           math.ceil(in_features / BLOCK)))
        self._dense: tuple[tuple, torch.Tensor] | None = None  # the last dequantized weight, with its key

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in `dtype`, dequantized once and reused until the weight or scales change
        (absorbed MLA needs kv_b_proj dense at every step)."""
        key = (dtype, self.weight.device, self.weight._version, self.weight_scale_inv._version,
               self.weight.data_ptr(), self.weight_scale_inv.data_ptr())
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, dequantize_weight(self.weight, self.weight_scale_inv, dtype=dtype))
        return self._dense[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        flat = rearrange(x, "... k -> (...) k")
        x_q, x_scale = quantize_activation(flat, scale_fmt=self.scale_fmt)
        y = fp8_matmul(x_q, x_scale, self.weight, self.weight_scale_inv)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 128x128 blocks"


def linear_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight as a dense tensor: the parameter, or the dequantized FP8 weight."""
    if isinstance(module, FP8Linear):
        return module.dequantized_weight(dtype)
    return module.weight


# ------------------------------------------------------------------------------- accumulation precision
def truncate_mantissa(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """x rounded toward zero to `mantissa_bits` fraction bits (float32 has 23)."""
    m, e = torch.frexp(x)  # x = m * 2^e with 0.5 <= |m| < 1: m carries mantissa_bits + 1 significant bits
    scale = 2.0 ** (mantissa_bits + 1)
    return torch.ldexp(torch.trunc(m * scale) / scale, e)


def limited_precision_dot(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int,
                          promote_every: int | None = None) -> torch.Tensor:
    """Row-wise dot products of a, b (rows, K), accumulated as a tensor core does it.

    Each product (exact) is added to an accumulator that keeps only `mantissa_bits` fraction bits
    (truncated after every addition). With promote_every = N_C, the accumulator is added into a
    float32 total and cleared every N_C elements, as DeepSeek-V3's kernels do on CUDA cores.
    Returns (rows,) float64 holding the float32 result.
    """
    products = a.double() * b.double()  # (rows, K): exact for FP8 inputs
    total = torch.zeros(products.shape[0], dtype=torch.float64)
    acc = torch.zeros_like(total)
    for i in range(products.shape[1]):
        acc = truncate_mantissa(acc + products[:, i], mantissa_bits)
        if promote_every and (i + 1) % promote_every == 0:
            total = (total + acc).float().double()
            acc = torch.zeros_like(acc)
    return (total + acc).float().double()
