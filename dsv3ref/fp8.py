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
- `fp8_matmul_dequantized` is the fast path on a CPU (fp8_kernel "dequantize"): the same E4M3
  operands and scales, each dequantized (value times its scale, rounded once to the GEMM's
  precision) and multiplied in one dense GEMM, so the sum over K runs in float32 (float64 for a
  float64 model) in the BLAS's order instead of exact 128-term blocks. It moves a result by float32
  rounding (about 1e-6 relative: tested), far less than E4M3's own step (2^-4) or the tensor cores'
  accumulation (below), at the speed of a float32 GEMM.
- `fp8_matmul_scaled_mm` runs the same GEMM through torch's `scaled_mm`, the fast path: on a
  Hopper GPU (SM90) as one cuBLAS call with BlockWise1x128 x BlockWise128x128 scales, on a CPU as
  one call per K block with per-row scales (torch's CPU kernel has no block recipes).
- Tensor cores accumulate FP8 products with about 14 mantissa bits; the report measures up to ~2%
  error at K = 4096 and fixes it by promoting partial sums to float32 every N_C = 128 elements.
  `limited_precision_dot` reproduces that experiment.
"""

from __future__ import annotations

import functools
import math
import re
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from dsv3ref.impl import CHOICES, check_choice
from dsv3ref.swap import current

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-4
SCALE_SUFFIX = "_scale_inv"  # checkpoint name of a weight's block scales: "x.weight" + SCALE_SUFFIX
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}
"""config.json's `quantization_config` of a checkpoint in this format (DeepSeek-V3's release)."""
FP8_KERNELS = CHOICES["fp8_kernel"]  # the vocabulary's values (dsv3ref.impl)
FP8_WEIGHT = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                        r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")
"""The weights DeepSeek-V3's release stores in FP8: the linear projections of attention and of every
FFN (dense MLPs, routed and shared experts), in the main layers and the MTP modules. Embeddings,
norms, routers, the MTP module's eh_proj and the heads stay in high precision."""


def _pad_to(x: torch.Tensor, dims: tuple[int, ...], block: int) -> torch.Tensor:
    """Zero-pad the given trailing dims of x up to multiples of block."""
    pad = []
    for d in reversed(range(x.dim())):
        pad += [0, (-x.shape[d]) % block if d in dims else 0]
    return F.pad(x, pad) if any(pad) else x  # on the grid already (most weights): no padded copy


def decode_e4m3(q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of E4M3 tensor q in `dtype`, exactly as q.to(dtype) gives them (every E4M3 value,
    NaN aside, is exact in float16 and wider). On a CPU by a 256-entry table: torch converts E4M3
    elementwise at about 240M values/s on one thread, the table lookup about four times faster
    (benchmarks: the FP8 emulation's GEMMs and the fp8-to-bf16 conversion spend that time)."""
    if q.device.type != "cpu":
        return q.to(dtype)
    table = _E4M3_VALUES.get(dtype)
    if table is None:
        table = torch.arange(256, dtype=torch.uint8).view(E4M3).to(dtype)  # (256,): every byte's value
        if type(table) is torch.Tensor:  # kept unless made under fake tensors (a simulation), which hold no values
            _E4M3_VALUES[dtype] = table
    return table.index_select(0, q.view(torch.uint8).flatten().int()).view(q.shape)  # int32: less to move


_E4M3_VALUES: dict[torch.dtype, torch.Tensor] = {}  # decode_e4m3's tables, made once per dtype


def _ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round positive scales up to a power of two (never smaller, so x / scale stays within 448)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def quantize_weight(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> fp8 weight (out, in) and weight_scale_inv (ceil(out/block), ceil(in/block)) float32."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: expected a 2-D weight, found shape {tuple(w.shape)}")
    out_dim, in_dim = w.shape
    blocks = rearrange(_pad_to(w.float(), (0, 1), block), "(fb o) (kb i) -> fb kb o i", o=block, i=block)
    amax = blocks.abs().amax(dim=(-1, -2)).clamp(min=AMAX_FLOOR)  # (fb, kb)
    scale = amax / E4M3_MAX
    if scale_fmt == "ue8m0":
        scale = _ue8m0(scale)
    q = (blocks / scale[..., None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    q = rearrange(q, "fb kb o i -> (fb o) (kb i)")[:out_dim, :in_dim]
    return q.contiguous(), scale.contiguous()


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The published rule: each block of the fp8 weight times its weight_scale_inv; padded, then cropped."""
    out_dim, in_dim = q.shape
    expected = (math.ceil(out_dim / block), math.ceil(in_dim / block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv: expected shape {expected} for a weight of shape {tuple(q.shape)}, "
                         f"found {tuple(scale_inv.shape)}")
    compute = torch.promote_types(dtype, torch.float32)  # float64 holds each product exactly; float32 as DeepSeek
    blocks = rearrange(_pad_to(decode_e4m3(q, compute), (0, 1), block), "(fb o) (kb i) -> fb kb o i", o=block,
                       i=block)
    w = rearrange(blocks * scale_inv.to(compute)[..., None, None], "fb kb o i -> (fb o) (kb i)")
    return w[:out_dim, :in_dim].to(dtype)


def _bands(rows: int, cols: int, block: int) -> int:
    """Rows per band of the fast paths: whole blocks, about 2^16 elements or one block row (in cache)."""
    return block * max(1, min(rows // block, 2**16 // (block * cols)))


def quantize_weight_fast(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_weight`, bit for bit (tested), one band of whole 128-row blocks at a time.

    A band is contiguous and fits in cache: its blocks' largest magnitudes, then each element divided
    by its block's scale, clamped and rounded to E4M3 straight into the output, with no padded or
    rearranged copy of the weight (3.5x faster than `quantize_weight` on a CPU; the converter's path).
    A weight off the block grid goes through `quantize_weight`."""
    if w.dim() != 2 or w.shape[0] % block or w.shape[1] % block:
        return quantize_weight(w, block, scale_fmt)
    (out_dim, in_dim), kb = w.shape, w.shape[1] // block
    q = torch.empty(out_dim, in_dim, dtype=E4M3, device=w.device)
    scale = torch.empty(out_dim // block, kb, device=w.device)
    step = _bands(out_dim, in_dim, block)
    for start in range(0, out_dim, step):
        rows = w[start:start + step]
        nb = rows.shape[0] // block
        if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            rows = rows.float()  # quantize_weight rounds to float32 first (bf16 and f16 divide exactly as float32)
        rows = rows.view(nb, block, kb, block)
        band = torch.abs(rows).float() if rows.dtype != torch.float32 else torch.abs(rows)
        amax = band.amax(dim=3).amax(dim=1).clamp(min=AMAX_FLOOR)  # (nb, kb): max is exact in any order
        s = amax / E4M3_MAX
        if scale_fmt == "ue8m0":
            s = _ue8m0(s)
        scale[start // block:start // block + nb] = s
        # quantize_weight's clamp to +-448 changes nothing here: |x| <= amax, so |x / s| is at most 448 times
        # (1 + 2^-23) (s = amax / 448 rounded; exactly 448 for a power-of-two ue8m0 s >= amax / 448), and E4M3
        # rounds everything below 464 to at most 448 (NaN stays NaN either way)
        torch.div(rows, s[:, None, :, None], out=band)
        q[start:start + step].view(nb, block, kb, block).copy_(band)
    return q, scale


def dequantize_weight_fast(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dequantize_weight`, bit for bit (tested), by table: a block holds at most 256 distinct bytes,
    so each block's 256 possible results (E4M3 value times the block's scale, rounded to dtype: the
    arithmetic of `dequantize_weight`) are computed once and every element looked up by its byte,
    one band of whole 128-row blocks at a time (7x faster on a CPU; the converter's path). A weight
    off the block grid goes through `dequantize_weight`."""
    expected = (math.ceil(q.shape[0] / block), math.ceil(q.shape[1] / block)) if q.dim() == 2 else None
    if q.device.type != "cpu" or expected is None or q.shape[0] % block or q.shape[1] % block \
            or tuple(scale_inv.shape) != expected:
        return dequantize_weight(q, scale_inv, block, dtype)
    (out_dim, in_dim), kb = q.shape, q.shape[1] // block
    compute = torch.promote_types(dtype, torch.float32)
    values = decode_e4m3(torch.arange(256, dtype=torch.uint8).view(E4M3), compute)  # (256,)
    tables = (values * scale_inv.to(compute)[..., None]).to(dtype).view(-1)  # (fb * kb * 256,)
    # where element (r, c) finds its value: its byte + 256 * (its block's place among the blocks)
    column = (torch.arange(kb, dtype=torch.int32) * 256).repeat_interleave(block)  # (in_dim,)
    step = _bands(out_dim, in_dim, block)
    index = torch.empty(step, in_dim, dtype=torch.int32)
    out = torch.empty(out_dim, in_dim, dtype=dtype)
    for start in range(0, out_dim, step):
        rows = q[start:start + step].view(torch.uint8)
        n = rows.shape[0]
        idx = index[:n].view(n // block, block, in_dim)
        torch.add(rows.view(n // block, block, in_dim), column, out=idx)
        first = start // block  # the band's first block row
        idx += (torch.arange(first, first + n // block, dtype=torch.int32) * (kb * 256))[:, None, None]
        torch.index_select(tables, 0, idx.view(-1), out=out[start:start + n].view(-1))
    return out

def quantize_activation(x: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> fp8 x (..., K) and scales (..., ceil(K/block)) float32, one per token per tile."""
    k = x.shape[-1]
    width = k if 0 < k < block else block  # one tile narrower than a block is taken as it is,
    pad = (-k) % width  # a narrower last tile after whole ones zero-padded (zeros change no scale)
    xf = F.pad(x.float(), (0, pad)) if pad else x.float()
    tiles = xf.reshape(*xf.shape[:-1], -(-k // block), width)  # (..., kb, width)
    scale = tiles.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / E4M3_MAX  # (..., kb)
    if scale_fmt == "ue8m0":
        scale = _ue8m0(scale)
    # no clamp to +-448: |x| <= amax, so |x / scale| is at most 448 (1 + 2^-23) (or at most 448 for a
    # floored or ue8m0 scale), and E4M3 rounds everything below 464 to at most 448 (NaN stays NaN)
    q = (tiles / scale[..., None]).to(E4M3).reshape(xf.shape)
    return (q[..., :k].contiguous() if pad else q), scale


def quantize_columns(x: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) in 128 x 1 tiles, `block` consecutive rows of one column (Wgrad's operands: the
    contraction runs over tokens) -> fp8 x (M, K) and scales (ceil(M/block), K) float32. The same
    numbers as `quantize_activation(x.T)` transposed, bit for bit (tested), with no transposed copy; a
    last tile of fewer rows is taken as it is (as quantize_activation pads it with zeros)."""
    m, whole = x.shape[0], x.shape[0] - x.shape[0] % block
    q = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scales = []
    for start, end in ((0, whole), (whole, m)):  # the whole tiles, then a shorter last one
        if end > start:
            tiles = rearrange(x[start:end].float(), "(mb i) k -> mb i k", i=min(end - start, block))
            scale = tiles.abs().amax(dim=1).clamp(min=AMAX_FLOOR) / E4M3_MAX  # (mb, K)
            if scale_fmt == "ue8m0":
                scale = _ue8m0(scale)
            # rounded to E4M3 by the copy; no clamp, for quantize_activation's reason
            q[start:end].view(tiles.shape).copy_(tiles / scale[:, None])
            scales.append(scale)
    return q, torch.cat(scales) if len(scales) > 1 else scales[0]


def dequantize_columns(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (M, K) E4M3 in 128 x 1 tiles with their scales (ceil(M / block), K), as `quantize_columns`
    gives them -> q * scale (M, K) in dtype, each product rounded once (as `dequantize_tiles`)."""
    values = decode_e4m3(q, torch.promote_types(dtype, torch.float32))  # (M, K), scaled in place below
    whole = q.shape[0] - q.shape[0] % block
    rearrange(values[:whole], "(mb i) k -> mb i k", i=block).mul_(scale[:whole // block, None])
    values[whole:].mul_(scale[whole // block:])  # a shorter last tile: one scale row
    return values.to(dtype)


def tile_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                block: int = BLOCK, accumulate: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b.T for FP8 operands that each carry one scale per row per `block`-wide K block.

    a_q (M, K) fp8 with a_scale (M, Kb); b_q (N, K) fp8 with b_scale (N, Kb). For each K block kb: the
    partial sum of FP8 products, exact (float64 holds a 128-term sum of E4M3 products exactly), times
    a_scale[:, kb] and b_scale[:, kb]; the blocks are accumulated in `accumulate` in order. Returns
    (M, N) in `accumulate`. The inference GEMM (`fp8_matmul`) and the three training GEMMs
    (dsv3ref.train.fp8) are this product with their scales laid out per row.
    """
    return tile_matmul_decoded(decode_e4m3(a_q, torch.float64), a_scale, decode_e4m3(b_q, torch.float64), b_scale,
                               block, accumulate)


def tile_matmul_decoded(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                        block: int = BLOCK, accumulate: torch.dtype = torch.float32) -> torch.Tensor:
    """`tile_matmul` of operands already decoded to float64 (E4M3 values, held exactly): a (M, K), b
    (N, K), any strides (FP8 training's Dgrad passes the forward's decoded weight transposed, and Wgrad both
    operands, quantized along their columns)."""
    a_s, b_s = a_scale.double(), b_scale.double()
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=accumulate, device=a.device)
    for kb, start in enumerate(range(0, a.shape[1], block)):  # one K block at a time; the last may be
        part = a[:, start:start + block] @ b[:, start:start + block].T  # narrower (zero padding adds nothing)
        part *= a_s[:, kb, None]  # (M, N): the block's exact sums, times both operands' scales
        part *= b_s[None, :, kb]
        acc += part.to(accumulate)
    return acc


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., K) E4M3 in 1 x `block` tiles with their scales (..., ceil(K / block)), as
    `quantize_activation` gives them -> the tiles' values q * scale (..., K) in dtype, each product
    rounded once (computed in dtype, at least float32, where every E4M3 value is exact)."""
    values = decode_e4m3(q, torch.promote_types(dtype, torch.float32))  # (..., K), scaled in place below
    whole = q.shape[-1] - q.shape[-1] % block
    rearrange(values[..., :whole], "... (kb i) -> ... kb i", i=block).mul_(scale[..., :whole // block, None])
    values[..., whole:].mul_(scale[..., whole // block:])  # a narrower last tile: one scale
    return values.to(dtype)


def fp8_matmul_dequantized(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale_inv: torch.Tensor,
                           block: int = BLOCK, accumulate: torch.dtype = torch.float32,
                           w_dense: torch.Tensor | None = None) -> torch.Tensor:
    """`fp8_matmul`'s product (same arguments, (M, N) in `accumulate`) with both operands dequantized
    first, x by its 1 x 128 tiles and w by its 128 x 128 blocks, and multiplied in one GEMM in
    `accumulate`: fp8_kernel "dequantize". w_dense: the weight already dequantized in `accumulate`, if the
    caller keeps it (FP8Linear does, once per weight)."""
    w = w_dense if w_dense is not None else dequantize_weight_fast(w_q, w_scale_inv, block, accumulate)
    return dequantize_tiles(x_q, x_scale, block, accumulate) @ w.T  # (M, K) @ (K, N)


def mn_major_tma_aligned(sf: torch.Tensor) -> torch.Tensor:
    """Scales sf (..., rows, kb) laid out as DeepGEMM reads LHS scales: MN-major (rows contiguous), the
    row axis padded to a multiple of 4 (16 bytes, TMA's alignment). Same values, other strides."""
    rows, kb = sf.shape[-2:]
    store = sf.new_zeros(*sf.shape[:-2], kb, rows + (-rows) % 4)
    store[..., :rows] = sf.transpose(-1, -2)
    return store.transpose(-1, -2)[..., :rows, :]


def rows_of_blocks(block_scale: torch.Tensor, rows: int, block: int = BLOCK) -> torch.Tensor:
    """A block-scale grid (Rb, Cb) as per-row scales (rows, Cb): each row takes its block's scale."""
    return repeat(block_scale, "rb cb -> (rb o) cb", o=block)[:rows]


def fp8_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale_inv: torch.Tensor,
               block: int = BLOCK, accumulate: torch.dtype = torch.float32) -> torch.Tensor:
    """The block-scaled FP8 GEMM y = x @ w.T, emulated exactly.

    x_q (M, K) fp8 with x_scale (M, Kb); w_q (N, K) fp8 with w_scale_inv (Nb, Kb). For each K block
    b: the partial sum of FP8 products, exact, times x_scale[:, b] and w_scale_inv[n // block, b]
    (`tile_matmul` with each weight row taking its block's scale); the blocks are accumulated in
    float32 in order (DeepSeek's recipe); returns (M, N) in that dtype. accumulate=torch.float64 keeps
    the sum exact to float64 rounding instead (what FP8Linear does for a float64 model: the oracle,
    whose result then does not depend on how the K blocks are grouped, e.g. split over ranks).
    """
    return tile_matmul(x_q, x_scale, w_q, rows_of_blocks(w_scale_inv, w_q.shape[0], block), block, accumulate)


def replace_fp8_layers(model: nn.Module, build: Callable[[nn.Linear], nn.Module], prefix: str = "") -> int:
    """Replace every bias-free nn.Linear of `model` whose weight the release stores in FP8
    (FP8_WEIGHT) by build(layer); returns how many were replaced. prefix: the checkpoint name of
    `model` itself ("model.layers.3." for one decoder layer), as FP8_WEIGHT reads whole names."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.bias is None and FP8_WEIGHT.search(f".{prefix}{name}.weight"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, build(module))
            count += 1
    return count


def scaled_mm_recipe(device: str | torch.device) -> str | None:
    """How `fp8_matmul_scaled_mm` runs on `device` with the installed torch.

    "blockwise": one `scaled_mm` call with BlockWise1x128 (activations) x BlockWise128x128 (weights)
    scales, which cuBLAS offers on SM90 (H100/H200) from CUDA 12.9; "rowwise": one call per 128-wide
    K block with per-row scales (torch's CPU kernel); None: neither.
    """
    if not hasattr(F, "scaled_mm"):
        return None
    device = torch.device(device)
    if device.type == "cpu":
        return "rowwise" if _cpu_scaled_mm_runs() else None
    if device.type == "cuda" and torch.version.cuda:
        cuda = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
        if torch.cuda.get_device_capability(device) == (9, 0) and cuda >= (12, 9):
            return "blockwise"
    return None


@functools.cache
def _cpu_scaled_mm_runs() -> bool:
    """Whether this torch build has scaled_mm's CPU kernel: the CPU wheels have it, some CUDA builds
    (torch 2.11+cu130, seen on an H200 machine) register the operator for CUDA only. Tried once."""
    a = torch.zeros(16, 16, dtype=E4M3)
    one = torch.ones(16, 1)
    try:
        F.scaled_mm(a, a.t(), one, F.ScalingType.RowWise, one.t().contiguous(), F.ScalingType.RowWise,
                    output_dtype=torch.float32)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def auto_kernel(device: str | torch.device) -> str:
    """fp8_kernel "auto": "scaled_mm" where torch's blockwise scaled_mm runs (one cuBLAS call: SM90 with
    CUDA >= 12.9), the exact emulation elsewhere (the CPU's per-K-block scaled_mm is no faster)."""
    return "scaled_mm" if scaled_mm_recipe(device) == "blockwise" else "emulate"


def _pad_fp8(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an FP8 matrix to (rows, cols); the all-zero byte is E4M3's +0. No copy if no padding."""
    if q.shape == (rows, cols):
        return q
    padded = F.pad(q.view(torch.uint8), (0, cols - q.shape[1], 0, rows - q.shape[0]))
    return padded.view(q.dtype)


def blockwise_weight(w_q: torch.Tensor, w_scale_inv: torch.Tensor, block: int = BLOCK
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's side of `blockwise_operands`: B = w.T (K, N) column-major, K zero-padded to whole
    blocks and N to a multiple of 16, and scale_b (L4, Nb) K-major. It depends on the weight alone, so
    FP8Linear builds it once. Views of the weight and its scales where nothing is padded (K a multiple of
    512 and N of 16: most of the release's FP8 weights, whole or split over 8 GPUs); padded copies otherwise."""
    n, k = w_q.shape
    kb = -(-k // block)
    scale_b = w_scale_inv.contiguous() if kb % 4 == 0 else F.pad(w_scale_inv, (0, (-kb) % 4))  # (Nb, L4)
    return _pad_fp8(w_q, n + (-n) % 16, kb * block).t(), scale_b.t()


def blockwise_operands(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale_inv: torch.Tensor,
                       block: int = BLOCK, weight: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """The arguments of one `scaled_mm` call in the layout cuBLAS's block scaling expects.

    K is zero-padded to whole blocks and M, N to multiples of 16 (cuBLAS's FP8 alignment); A is
    x (M, K) row-major, B is w.T (K, N) column-major; scale_a is x_scale (M, Kb) stored M-major
    (stride (1, M)); scale_b is w_scale_inv with Kb padded to L4 = a multiple of 4, seen as (L4, Nb)
    K-major (stride (1, L4)). Scales are dequantization factors, as in the checkpoint. weight: the
    weight's `blockwise_weight`, if the caller keeps it (built here otherwise).
    """
    m = x_q.shape[0]
    kb, mp = x_scale.shape[1], m + (-m) % 16
    mat_b, scale_b = weight if weight is not None else blockwise_weight(w_q, w_scale_inv, block)
    # x_scale written M-major in one copy: transposed, padded with ones past M where M is not a multiple of 16
    scale_a = F.pad(x_scale.t(), (0, mp - m), value=1.0) if mp != m else x_scale.t().contiguous()  # (Kb, Mp)
    return dict(mat_a=_pad_fp8(x_q, mp, kb * block), mat_b=mat_b,
                scale_a=scale_a.t(), scale_recipe_a=F.ScalingType.BlockWise1x128,
                scale_b=scale_b, scale_recipe_b=F.ScalingType.BlockWise128x128,
                output_dtype=torch.float32)


def rowwise_weight(w_q: torch.Tensor, w_scale_inv: torch.Tensor, block: int = BLOCK
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight side of the per-K-block ("rowwise") scaled_mm: w_q (N, K) as K blocks (kb, N, 128),
    each contiguous, and each row's block scale as (kb, 1, N). It depends on the weight alone, so
    FP8Linear builds it once (one more FP8 copy of the weight) instead of at every call."""
    n, k = w_q.shape
    kb = math.ceil(k / block)
    blocks = rearrange(_pad_fp8(w_q, n, kb * block), "f (kb i) -> kb f i", i=block)
    rows = repeat(w_scale_inv, "fb kb -> kb 1 (fb o)", o=block)[..., :n]
    # scaled_mm checks strides literally, even of size-1 axes: give both fresh row-major strides
    return _packed(blocks), _packed(rows)


def _packed(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def fp8_matmul_scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale_inv: torch.Tensor,
                         block: int = BLOCK, w_rowwise: tuple[torch.Tensor, torch.Tensor] | None = None,
                         w_blockwise: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`fp8_matmul` (same arguments, same (M, N) float32 result) through torch's `scaled_mm`.

    See `scaled_mm_recipe` for how it runs on each device. The per-K-block ("rowwise") form computes
    exactly the emulation's formula: a float32 block product scaled by x_scale[m, b] and
    w_scale_inv[n // 128, b], blocks accumulated in float32 in order. w_rowwise, w_blockwise: the
    weight's `rowwise_weight` or `blockwise_weight`, if the caller keeps it (built here otherwise).
    """
    recipe = scaled_mm_recipe(x_q.device)
    m, k = x_q.shape
    n, kb = w_q.shape[0], x_scale.shape[1]
    if recipe == "blockwise":
        return F.scaled_mm(**blockwise_operands(x_q, x_scale, w_q, w_scale_inv, block, w_blockwise))[:m, :n]
    if recipe is None:
        raise ValueError(f"fp8_matmul_scaled_mm: torch {torch.__version__} has no block-scaled scaled_mm on "
                         f"{x_q.device} (needs a torch build with scaled_mm's CPU kernel, or an SM90 GPU with "
                         "CUDA >= 12.9); use fp8_matmul")
    w_blocks, w_rows = w_rowwise if w_rowwise is not None else rowwise_weight(w_q, w_scale_inv, block)
    xb = _packed(rearrange(_pad_fp8(x_q, m, kb * block), "m (kb i) -> kb m i", i=block))  # (kb, m, 128)
    x_cols = _packed(rearrange(x_scale, "m kb -> kb m 1"))  # (kb, m, 1)
    acc = torch.zeros(m, n, dtype=torch.float32, device=x_q.device)
    for b in range(kb):
        acc = acc + F.scaled_mm(xb[b], w_blocks[b].t(), x_cols[b], F.ScalingType.RowWise, w_rows[b],
                                F.ScalingType.RowWise, output_dtype=torch.float32)
    return acc


class FP8Linear(nn.Module):
    """A bias-free linear layer whose weight is stored in FP8 with 128 x 128 block scales.

    Checkpoint names: `weight` (float8_e4m3fn, (out, in)) and `weight_scale_inv` (float32). The
    input is quantized per token per 128 channels on the fly (activation_scheme "dynamic") and
    multiplied with `fp8_matmul` (kernel "emulate", the exact oracle), `fp8_matmul_dequantized` (kernel
    "dequantize") or `fp8_matmul_scaled_mm` (kernel "scaled_mm"); the result is cast to the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, scale_fmt: str | None = None,
                 kernel: str = "emulate"):
        super().__init__()
        self.in_features, self.out_features, self.scale_fmt = in_features, out_features, scale_fmt
        self.kernel = check_choice("fp8_kernel", kernel)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=E4M3))
        self.register_buffer("weight_scale_inv", torch.ones(math.ceil(out_features / BLOCK),
                                                           math.ceil(in_features / BLOCK)))
        self._derived: dict = {}  # name -> (weight, scales (weak references), their versions, what was built)

    def _apply(self, fn, recurse=True):
        """Moves (`.to(device)`, `to_empty`) apply; dtype casts (`model.to(torch.bfloat16)`) do not: the
        weight stays E4M3 and its scales float32, which is what this layer is."""
        before = {name: self._buffers[name] for name in ("weight", "weight_scale_inv")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _from_weight(self, name: str, build):
        """build(), computed once and reused until the weight or its scales change (are written to, or
        replaced by other tensors: a move, a parallel plan's narrowing)."""
        weight, scale = self.weight, self.weight_scale_inv
        entry = self._derived.get(name)
        if (entry is None or entry[0]() is not weight or entry[1]() is not scale
                or entry[2] != (weight._version, scale._version)):
            entry = (weakref.ref(weight), weakref.ref(scale), (weight._version, scale._version), build())
            self._derived[name] = entry
        return entry[3]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in `dtype`, dequantized once and reused until the weight or scales change
        (absorbed MLA needs kv_b_proj dense at every step)."""
        return self._from_weight(f"dense {dtype}",
                                 lambda: dequantize_weight(self.weight, self.weight_scale_inv, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if self.in_features == 0 or self.out_features == 0:  # a parallel plan left this rank no part of it
            return x.new_zeros(*x.shape[:-1], self.out_features)
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        x_q, x_scale = quantize_activation(flat, scale_fmt=self.scale_fmt)
        if current().fp8_gemm is not None:
            return self.swapped_gemm(current().fp8_gemm, x_q, x_scale, x.dtype).reshape(*x.shape[:-1], -1)
        if self.kernel == "scaled_mm":
            recipe, operands = scaled_mm_recipe(x.device), {}  # the weight's side, built once
            if recipe == "rowwise":
                operands["w_rowwise"] = self._from_weight(
                    "rowwise", lambda: rowwise_weight(self.weight, self.weight_scale_inv))
            elif recipe == "blockwise":
                operands["w_blockwise"] = self._from_weight(
                    "blockwise", lambda: blockwise_weight(self.weight, self.weight_scale_inv))
            y = fp8_matmul_scaled_mm(x_q, x_scale, self.weight, self.weight_scale_inv, **operands)
        elif self.kernel == "dequantize":
            acc = torch.promote_types(x.dtype, torch.float32)
            y = fp8_matmul_dequantized(x_q, x_scale, self.weight, self.weight_scale_inv, accumulate=acc,
                                       w_dense=self.dequantized_weight(acc))
        else:
            # (tokens, out): float32 accumulation, as DeepSeek's kernels; float64 for a float64 model
            y = fp8_matmul(x_q, x_scale, self.weight, self.weight_scale_inv,
                           accumulate=torch.promote_types(x.dtype, torch.float32))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def swapped_gemm(self, gemm: Callable, x_q: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype
                     ) -> torch.Tensor:
        """The product through a user's function with DeepGEMM's `fp8_gemm_nt((a, sfa), (b, sfb), d)`
        interface (`dsv3ref.kernels.use(fp8_gemm=...)`). K is zero-padded to whole 128-blocks, as that
        interface requires (an E4M3 zero adds nothing); the activation scales are handed over MN-major and
        TMA-aligned, as DeepGEMM reads them; d (tokens, out) is in the activations' dtype."""
        k = x_scale.shape[1] * BLOCK
        weight = self._from_weight("padded", lambda: _pad_fp8(self.weight, self.out_features, k))
        d = torch.empty(x_q.shape[0], self.out_features, dtype=dtype, device=x_q.device)
        gemm((_pad_fp8(x_q, x_q.shape[0], k), mn_major_tma_aligned(x_scale)), (weight, self.weight_scale_inv), d)
        return d

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8 128x128 blocks, "
                f"kernel={self.kernel}")


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
