"""Deliberately broken "kernels", for the lesson and the tests: each has the interface of the op it
breaks and one mistake that a real port could make. `python -m dsv3ref.kernels.check` and
`dsv3ref.compare` must catch each.

- `mla_decode_floor_blocks`: counts a sequence's pages as seqlen // 64 instead of rounding up, so
  the positions of its last, partly filled page are never read (right whenever seqlen is a multiple
  of 64, wrong otherwise).
- `fp8_gemm_sfa_k_major`: reads the activation scales' storage as if it were K-major (row after row)
  while DeepGEMM hands them over MN-major: the scale of one (token, K block) lands on another. Right
  while K is one block; wrong from K = 256.
- `grouped_contiguous_shifted_index`: takes row r's expert from m_indices[r - 1], so the first row
  of every segment but the first is computed as padding (zero). (FP8 operands or, as the model's
  grouped experts call it, high-precision ones.)
- `grouped_masked_one_short`: computes masked_m[g] - 1 rows of each group.
"""

from __future__ import annotations

import torch

from dsv3ref.kernels.gemm import (
    fp8_gemm_nt,
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from dsv3ref.kernels.mla_decode import flash_mla_with_kvcache


def mla_decode_floor_blocks(q, k_cache, block_table, cache_seqlens, head_dim_v, *args, **kwargs):
    page = k_cache.shape[1]
    return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens // page * page, head_dim_v, *args, **kwargs)


def fp8_gemm_sfa_k_major(a, b, d, *args, **kwargs):
    a_q, sfa = a
    m, kb = sfa.shape
    storage = torch.as_strided(sfa, (sfa.untyped_storage().nbytes() // 4,), (1,), 0)  # the raw floats
    misread = storage[: m * kb].reshape(m, kb) if sfa.stride(0) != kb else storage[: kb * m].reshape(kb, m).T
    return fp8_gemm_nt((a_q, misread.contiguous()), b, d, *args, **kwargs)


def grouped_contiguous_shifted_index(a, b, d, m_indices, *args, **kwargs):
    if isinstance(a, tuple):  # FP8 operands with their scales
        m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices, *args, **kwargs)
    else:
        m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices, *args, **kwargs)
    shifted = torch.cat([m_indices[:1], m_indices[:-1]])  # row r reads m_indices[r - 1]
    d[shifted < 0] = 0  # a segment's first row, after another's padding, taken for padding
    return d


def grouped_masked_one_short(a, b, d, masked_m, expected_m, *args, **kwargs):
    return m_grouped_fp8_gemm_nt_masked(a, b, d, (masked_m - 1).clamp(min=0), expected_m, *args, **kwargs)
