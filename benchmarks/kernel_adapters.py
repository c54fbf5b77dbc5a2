"""GPU kernels wrapped into the interfaces `python -m dsv3ref.kernels.check` calls, for
benchmarks/gpu_checks.sh. Each adapter only moves arguments; the kernel computes.

- `scaled_mm_gemm`: torch's blockwise `scaled_mm` (cuBLAS on SM90, CUDA >= 12.9) as fp8_gemm_nt;
- `flash_mla_decode`: FlashMLA's `flash_mla_with_kvcache` from the `flash_mla` package, or the copy
  sgl-kernel ships (`sgl_kernel.flash_mla`), whichever is installed; the scheduler metadata is made
  here, in the new style (no arguments) or the old one (cache_seqlens, heads per key head, key heads).
"""

from __future__ import annotations

import importlib
import inspect

from dsv3ref.fp8 import fp8_matmul_scaled_mm


def scaled_mm_gemm(a, b, d, *args, **kwargs):
    (a_q, sfa), (b_q, sfb) = a, b
    return d.copy_(fp8_matmul_scaled_mm(a_q, sfa.contiguous(), b_q, sfb))


def _flash_mla():
    for name in ("flash_mla", "sgl_kernel.flash_mla"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("neither flash_mla nor sgl_kernel.flash_mla is installed")


def flash_mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata=None,
                     num_splits=None, softmax_scale=None, causal=False):
    lib = _flash_mla()
    if inspect.signature(lib.get_mla_metadata).parameters.get("cache_seqlens") is not None:
        h_k = k_cache.shape[2]
        meta, splits = lib.get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2] // h_k, h_k)
    else:
        meta, splits = lib.get_mla_metadata()
    return lib.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, splits,
                                      softmax_scale=softmax_scale, causal=causal)
