"""Block-scaled FP8 GEMMs with DeepGEMM's interfaces: plain, M-grouped "contiguous" and "masked".

DeepGEMM computes D = C + A @ B.T ("nt": A row-major (M, K), B row-major (N, K)) with FP8 operands
that carry float32 scales (dequantized value = fp8 value * scale):

    a = (A fp8 (M, K), sfa (M, K/128))            1 x 128 tiles: one scale per row per 128 columns
    b = (B fp8 (N, K), sfb (ceil(N/128), K/128))  128 x 128 blocks (SM90's recipe), or
                       sfb (N, K/128)             1 x 128 per row (SM100's recipe)
    d (M, N) bf16 or float32, written in place;   K must be a multiple of 128.

Scales may also come as UE8M0 (SM100's format): powers of two stored as 8-bit exponents, four to an
int32 (the first K block in the lowest byte), shape (rows, ceil(K/512)); scale = 2^(byte - 127).
DeepGEMM wants sfa MN-major and TMA-aligned (`get_mn_major_tma_aligned_tensor`); the reference reads
any strides, and checks DeepGEMM's layout when asked (`tma_layout=True`; `dsv3ref.fp8.mn_major_tma_aligned`
lays scales out so).

Grouped GEMMs share N and K across G groups (experts) and group the M axis:

    contiguous (prefill, training): A (M_sum, K) holds every expert's rows back to back, each expert's
      segment padded to a multiple of 128 rows (`get_mk_alignment_for_contiguous_layout`);
      m_indices (M_sum,) int32 gives each row's expert, -1 on padding rows.
          rows   0-127  expert 0 (100 rows + 28 padding)   m_indices = 0 ... 0, -1 ... -1
          rows 128-383  expert 2 (256 rows)                m_indices = 2 ... 2
          (expert 1 received nothing: no rows at all)
    masked (decoding, CUDA graphs): A (G, M_max, K), one fixed-size slab per expert, of which only the
      first masked_m[g] rows are valid; the host never learns the counts (DeepEP's low-latency
      dispatch writes exactly this layout). expected_m is a hint for the kernel's tiling.

The reference is `dsv3ref.fp8.tile_matmul`: exact FP8 products per 128-wide K block, each block scaled
by its two scales, blocks accumulated in float32 in order (float64 with accumulate=torch.float64).
Rows a kernel leaves alone are left alone here too: padding rows of the contiguous layout are set to
zero and rows past masked_m are not written.
"""

from __future__ import annotations

import math

import torch

from dsv3ref.fp8 import BLOCK, E4M3, rows_of_blocks, tile_matmul

MK_ALIGNMENT = BLOCK
"""Rows of each expert's segment in the contiguous layout: a multiple of this."""


def get_mk_alignment_for_contiguous_layout() -> int:
    """DeepGEMM's name for MK_ALIGNMENT."""
    return MK_ALIGNMENT


def unpack_ue8m0(packed: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """UE8M0 scales packed four to an int32 (rows, ceil(k_blocks / 4)) -> float32 (rows, k_blocks)."""
    exponents = packed.contiguous().view(torch.uint8).reshape(*packed.shape[:-1], -1)[..., :k_blocks]
    return torch.exp2(exponents.float() - 127.0)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """float32 power-of-two scales (rows, kb) -> UE8M0 packed four to an int32 (rows, ceil(kb / 4))."""
    exponents = (torch.log2(scales).round() + 127).to(torch.uint8)
    pad = (-exponents.shape[-1]) % 4
    exponents = torch.nn.functional.pad(exponents, (0, pad), value=127)
    return exponents.contiguous().view(torch.int32)


def _k_blocks(name: str, t: torch.Tensor) -> int:
    if t.dtype != E4M3:
        raise ValueError(f"{name}: expected float8_e4m3fn values, found {t.dtype}")
    if t.shape[-1] % BLOCK:
        raise ValueError(f"{name}: K = {t.shape[-1]} is not a multiple of {BLOCK} (found shape {tuple(t.shape)}); "
                         f"DeepGEMM's scales cover whole 128-wide K blocks: pad K with zeros")
    return t.shape[-1] // BLOCK


def _scales(name: str, sf: torch.Tensor, shapes: dict[str, tuple[int, ...]], tma_layout: bool = False
            ) -> tuple[str, torch.Tensor]:
    """sf as float32 per the first of `shapes` ({kind: float32 shape}) it matches, float or UE8M0 packed."""
    for kind, shape in shapes.items():
        packed = (*shape[:-1], math.ceil(shape[-1] / 4))
        if sf.dtype == torch.float32 and tuple(sf.shape) == shape:
            if tma_layout and sf.dim() >= 2 and sf.shape[-2] > 1:
                aligned = sf.shape[-2] + (-sf.shape[-2]) % 4
                if sf.stride(-2) != 1 or sf.stride(-1) != aligned:
                    raise ValueError(f"{name}: strides {tuple(sf.stride())[-2:]} found; DeepGEMM reads these "
                                     f"scales MN-major, TMA-aligned: expected strides (1, {aligned}) "
                                     "(see mn_major_tma_aligned)")
            return kind, sf
        if sf.dtype == torch.int32 and tuple(sf.shape) == packed:
            return kind, unpack_ue8m0(sf, shape[-1])
    expected = " or ".join(f"{s} float32 ({k}) or {(*s[:-1], math.ceil(s[-1] / 4))} int32 UE8M0"
                           for k, s in shapes.items())
    raise ValueError(f"{name}: expected {expected}; found {tuple(sf.shape)} {sf.dtype}")


def _b_rows(name: str, sfb: torch.Tensor, n: int, kb: int) -> torch.Tensor:
    """sfb as per-row scales (n, kb): 128 x 128 blocks repeated over their rows, or already per row."""
    kind, sf = _scales(name, sfb, {"128x128 blocks": (math.ceil(n / BLOCK), kb), "1x128 per row": (n, kb)})
    return rows_of_blocks(sf, n) if kind == "128x128 blocks" else sf


def _gemm(a_q, sfa, b_q, sfb_rows, accumulate) -> torch.Tensor:
    return tile_matmul(a_q, sfa.float(), b_q, sfb_rows.float(), accumulate=accumulate)


def _check_out(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, found {tuple(t.shape)}")


def fp8_gemm_nt(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], d: torch.Tensor,
                c: torch.Tensor | None = None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims: str = "nk",
                disable_ue8m0_cast: bool = False, *, accumulate: torch.dtype = torch.float32,
                tma_layout: bool = False) -> torch.Tensor:
    """d = c + a @ b.T with a = (A fp8 (M, K), sfa), b = (B fp8 (N, K), sfb) (layouts in the module
    docstring); writes d in its dtype and returns it. recipe, compiled_dims and disable_ue8m0_cast are
    the kernel's tuning and are accepted as DeepGEMM takes them: scales are applied as given."""
    (a_q, sfa), (b_q, sfb) = a, b
    kb = _k_blocks("a", a_q)
    if _k_blocks("b", b_q) != kb or a_q.dim() != 2 or b_q.dim() != 2:
        raise ValueError(f"a, b: expected (M, K) and (N, K) with one K, found {tuple(a_q.shape)} and "
                         f"{tuple(b_q.shape)}")
    m, n = a_q.shape[0], b_q.shape[0]
    _check_out("d", d, (m, n))
    _, sfa = _scales("sfa", sfa, {"1x128": (m, kb)}, tma_layout)
    y = _gemm(a_q, sfa, b_q, _b_rows("sfb", sfb, n, kb), accumulate)  # (m, n)
    if c is not None:
        _check_out("c", c, (m, n))
        y = y + c.to(accumulate)
    return d.copy_(y)


def m_grouped_fp8_gemm_nt_contiguous(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                     d: torch.Tensor, m_indices: torch.Tensor, recipe=None, recipe_a=None,
                                     recipe_b=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
                                     *, accumulate: torch.dtype = torch.float32) -> torch.Tensor:
    """d[r] = A[r] @ B[m_indices[r]].T for every row r with m_indices[r] >= 0 (zero on padding rows).

    a = (A fp8 (M_sum, K), sfa (M_sum, K/128)); b = (B fp8 (G, N, K), sfb (G, ceil(N/128), K/128) or
    (G, N, K/128)); d (M_sum, N); m_indices (M_sum,) int32, each expert's segment aligned to 128 rows.
    """
    (a_q, sfa), (b_q, sfb) = a, b
    kb = _k_blocks("a", a_q)
    if b_q.dim() != 3 or _k_blocks("b", b_q) != kb:
        raise ValueError(f"b: expected (groups, N, K={a_q.shape[-1]}), found {tuple(b_q.shape)}")
    g, n = b_q.shape[:2]
    m = a_q.shape[0]
    _check_out("d", d, (m, n))
    check_contiguous_layout(m_indices, m, g)
    _, sfa = _scales("sfa", sfa, {"1x128": (m, kb)})
    out = torch.zeros(m, n, dtype=accumulate, device=a_q.device)
    for e in range(g):
        rows = (m_indices == e).nonzero().flatten()
        if rows.numel():
            out[rows] = _gemm(a_q[rows], sfa[rows], b_q[e], _b_rows(f"sfb[{e}]", sfb[e], n, kb), accumulate)
    return d.copy_(out)


def check_contiguous_layout(m_indices: torch.Tensor, m: int, groups: int, alignment: int = MK_ALIGNMENT) -> None:
    """The contiguous layout's rules, each broken one named: one index per row, M a multiple of the
    alignment, every aligned block of rows belonging to one expert (its padding rows -1 at the end)."""
    if tuple(m_indices.shape) != (m,) or m_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"m_indices: expected an int32 tensor of shape ({m},) (one expert per row of a), found "
                         f"{m_indices.dtype} {tuple(m_indices.shape)}")
    if m % alignment:
        raise ValueError(f"a: M = {m} rows is not a multiple of {alignment}; in the contiguous layout every expert's "
                         f"segment is padded to {alignment} rows (get_mk_alignment_for_contiguous_layout)")
    bad = (m_indices < -1) | (m_indices >= groups)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(f"m_indices[{r}] = {int(m_indices[r])}: expected an expert 0..{groups - 1} or -1 (padding)")
    for start in range(0, m, alignment):
        block = m_indices[start:start + alignment]
        experts = block[block >= 0].unique()
        padded = (block < 0).nonzero()
        rows_after_padding = padded.numel() and bool((block[int(padded[0]):] >= 0).any())
        if experts.numel() > 1 or rows_after_padding:
            raise ValueError(f"m_indices: rows {start}..{start + alignment - 1} hold experts {experts.tolist()} "
                             f"(padding at {padded.flatten().tolist()[:4]}...); each aligned block of {alignment} "
                             f"rows must belong to one expert, its padding (-1) after its rows: misaligned segments")


def m_grouped_fp8_gemm_nt_masked(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                 d: torch.Tensor, masked_m: torch.Tensor, expected_m: int, recipe=None,
                                 recipe_a=None, recipe_b=None, compiled_dims: str = "nk",
                                 disable_ue8m0_cast: bool = False, *, accumulate: torch.dtype = torch.float32
                                 ) -> torch.Tensor:
    """d[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g].T; rows past masked_m[g] are not written.

    a = (A fp8 (G, M_max, K), sfa (G, M_max, K/128)); b = (B fp8 (G, N, K), sfb (G, ceil(N/128), K/128)
    or (G, N, K/128)); d (G, M_max, N); masked_m (G,) int32, each at most M_max.
    """
    (a_q, sfa), (b_q, sfb) = a, b
    kb = _k_blocks("a", a_q)
    if a_q.dim() != 3 or b_q.dim() != 3 or _k_blocks("b", b_q) != kb or b_q.shape[0] != a_q.shape[0]:
        raise ValueError(f"a, b: expected (G, M_max, K) and (G, N, K) with one G and K, found {tuple(a_q.shape)} "
                         f"and {tuple(b_q.shape)}")
    g, m_max, _ = a_q.shape
    n = b_q.shape[1]
    _check_out("d", d, (g, m_max, n))
    if tuple(masked_m.shape) != (g,):
        raise ValueError(f"masked_m: expected shape ({g},) (valid rows of each group), found {tuple(masked_m.shape)}")
    counts = masked_m.tolist()
    for e, count in enumerate(counts):
        if not 0 <= count <= m_max:
            raise ValueError(f"masked_m[{e}] = {count}: expected 0..{m_max} (a's rows per group)")
    _, sfa = _scales("sfa", sfa, {"1x128": (g, m_max, kb)})
    for e, count in enumerate(counts):
        if count:
            y = _gemm(a_q[e, :count], sfa[e, :count], b_q[e], _b_rows(f"sfb[{e}]", sfb[e], n, kb), accumulate)
            d[e, :count] = y.to(d.dtype)
    return d


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, m_indices: torch.Tensor,
                                      compiled_dims: str = "nk") -> torch.Tensor:
    """The contiguous layout in high precision (DeepGEMM's BF16 grouped GEMM, any float dtype here):
    d[r] = a[r] @ b[m_indices[r]].T, zero on padding rows. a (M_sum, K), b (G, N, K), d (M_sum, N)."""
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[2]:
        raise ValueError(f"a, b: expected (M_sum, K) and (groups, N, K), found {tuple(a.shape)} and {tuple(b.shape)}")
    m, (g, n, _) = a.shape[0], b.shape
    _check_out("d", d, (m, n))
    check_contiguous_layout(m_indices, m, g)
    out = torch.zeros(m, n, dtype=torch.promote_types(a.dtype, torch.float32), device=a.device)
    for e in range(g):
        rows = (m_indices == e).nonzero().flatten()
        if rows.numel():
            out[rows] = a[rows].to(out.dtype) @ b[e].to(out.dtype).T  # (rows, K) @ (K, N)
    return d.copy_(out)


def contiguous_layout(counts: list[int], alignment: int = MK_ALIGNMENT) -> tuple[torch.Tensor, torch.Tensor]:
    """For row counts per expert: (m_indices (M_sum,) int32 of the padded layout, rows (sum(counts),)
    long: where each input row, experts in order, sits in it)."""
    m_indices, rows, start = [], [], 0
    for e, count in enumerate(counts):
        padded = count + (-count) % alignment
        m_indices += [e] * count + [-1] * (padded - count)
        rows += range(start, start + count)
        start += padded
    return torch.tensor(m_indices, dtype=torch.int32), torch.tensor(rows, dtype=torch.long)
