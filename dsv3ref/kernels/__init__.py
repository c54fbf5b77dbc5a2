"""The reference for DeepSeek's open kernels: the ops FlashMLA, DeepGEMM and DeepEP compute, with
their interfaces, computed plainly in float32 (float64 on request) on any device.

| module       | library  | ops                                                                      |
|--------------|----------|--------------------------------------------------------------------------|
| `mla_decode` | FlashMLA | `flash_mla_with_kvcache` over a paged latent cache, `get_mla_metadata`   |
| `gemm`       | DeepGEMM | `fp8_gemm_nt`, `m_grouped_fp8_gemm_nt_contiguous`,                        |
|              |          | `m_grouped_fp8_gemm_nt_masked`, `m_grouped_bf16_gemm_nt_contiguous`       |
| `ep`         | DeepEP   | `get_dispatch_layout`, `dispatch`/`combine` (normal mode),                |
|              |          | `low_latency_dispatch`/`low_latency_combine`; `*_dist` as collectives     |

Each module's docstring draws its layouts. `use(mla_decode=..., fp8_gemm=..., grouped_gemm=...)`
runs the whole model through your functions inside a `with` block (dsv3ref.swap), so that
`dsv3ref.trace` and `compare` show where the model's output first changes; `python -m
dsv3ref.kernels.check MODULE:FUNC --op ...` runs the reference's sweep of cases against your function
on your device (dsv3ref.kernels.check).
"""

from dsv3ref.fp8 import mn_major_tma_aligned
from dsv3ref.kernels.ep import (
    combine,
    combine_dist,
    dispatch,
    dispatch_dist,
    get_dispatch_layout,
    low_latency_combine,
    low_latency_combine_dist,
    low_latency_dispatch,
    low_latency_dispatch_dist,
)
from dsv3ref.kernels.gemm import (
    fp8_gemm_nt,
    get_mk_alignment_for_contiguous_layout,
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from dsv3ref.kernels.mla_decode import PAGE_BLOCK_SIZE, flash_mla_with_kvcache, get_mla_metadata
from dsv3ref.swap import use

__all__ = [
    "PAGE_BLOCK_SIZE", "combine", "combine_dist", "dispatch", "dispatch_dist", "flash_mla_with_kvcache",
    "fp8_gemm_nt", "get_dispatch_layout", "get_mk_alignment_for_contiguous_layout", "get_mla_metadata",
    "low_latency_combine", "low_latency_combine_dist", "low_latency_dispatch", "low_latency_dispatch_dist",
    "m_grouped_bf16_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
    "mn_major_tma_aligned", "use",
]
