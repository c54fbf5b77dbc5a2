"""Which function computes each of the model's swappable operations: dsv3ref's reference, or yours.

A kernel author runs the whole model through their own kernel by naming it for the duration of a
`with` block (`dsv3ref.kernels.use`):

    with dsv3ref.kernels.use(mla_decode=my_flash_mla):
        logits = model(ids, cache=paged_cache)

| op             | interface (as the library publishes it)                      | where the model calls it            |
|----------------|--------------------------------------------------------------|-------------------------------------|
| `mla_decode`   | FlashMLA `flash_mla_with_kvcache(q, k_cache, block_table,     | `mla.MLA` over a `PagedKVCache`     |
|                | cache_seqlens, head_dim_v, tile_scheduler_metadata,          |                                     |
|                | num_splits, softmax_scale=, causal=)` -> (out, lse)          |                                     |
| `fp8_gemm`     | DeepGEMM `fp8_gemm_nt((a, sfa), (b, sfb), d)`: d = a @ b.T    | every `fp8.FP8Linear` (gemm_impl    |
|                |                                                              | "fp8")                              |
| `grouped_gemm` | DeepGEMM `m_grouped_bf16_gemm_nt_contiguous(a, b, d,          | `experts.StackedExperts` (moe_impl  |
|                | m_indices)`: rows of a grouped by expert, segments aligned   | "grouped")                          |

The references are in `dsv3ref.kernels`; this module only records the choice. It lives in a context
variable: a choice made in one thread (or task) is not seen by another, and it ends with its block.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Swaps:
    """The user functions in force (None: dsv3ref's reference op)."""

    mla_decode: Callable | None = None
    fp8_gemm: Callable | None = None
    grouped_gemm: Callable | None = None


_NONE = Swaps()  # frozen: safe to share as the default
_CURRENT: contextvars.ContextVar[Swaps] = contextvars.ContextVar("dsv3ref_swaps", default=_NONE)  # noqa: B039
OPS = tuple(f.name for f in dataclasses.fields(Swaps))


def current() -> Swaps:
    """The functions in force here."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(**ops: Callable | None) -> Iterator[Swaps]:
    """Run the model's ops through the given functions inside the `with` block (see the module
    docstring for the names and interfaces); ops not named keep their current function."""
    for name, fn in ops.items():
        if name not in OPS:
            raise ValueError(f"use: found op {name!r}, expected one of {OPS}")
        if fn is not None and not callable(fn):
            raise TypeError(f"use: {name} must be a function with the library's interface, found {type(fn).__name__}")
    token = _CURRENT.set(dataclasses.replace(_CURRENT.get(), **ops))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
