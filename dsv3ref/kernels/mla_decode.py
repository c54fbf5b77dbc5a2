"""MLA decoding over a paged latent cache, with FlashMLA's interface (`flash_mla_with_kvcache`).

Absorbed MLA (dsv3ref.mla) turns attention into multi-query attention over the latent: one key per
position, c^KV and k^R side by side (576 numbers in DeepSeek-V3), shared by every head, and the
value is the latent half of that same key. FlashMLA computes exactly that over a paged cache:

    k_cache (num_blocks, page_block_size, h_k, d)      a pool of pages; d = [ c^KV (dv) | k^R (d - dv) ]
                                                         DeepSeek-V3: (N, 64, 1, 576), dv = 512

    block_table (b, max_blocks) int32                  sequence i, position p lives in page
                                                         block_table[i, p // 64], slot p % 64
        seq 0: [ 7 | 2 | 9 | . ]   positions 0-63 in page 7, 64-127 in page 2, 128-191 in page 9
        seq 1: [ 4 | . | . | . ]   ("." entries are never read: cache_seqlens says how far to read)
    cache_seqlens (b,) int32                           valid positions of sequence i

    q (b, s_q, h_q, d)                                 [ W^UK-absorbed query (dv) | rotated q^R ]
    out (b, s_q, h_q, dv) = softmax(scale * q . k) v   v = the first dv channels of each key
    lse (b, h_q, s_q) float32                          log sum_s exp(scale * q . k_s), natural log

With causal=True and s_q > 1 the s_q queries are the sequence's last s_q positions: query j sees keys
0 .. seqlen - s_q + j (the mask aligned to the bottom right). A query with nothing to attend to
(seqlen 0, or causal with seqlen - s_q + j < 0) gets out = 0 and lse = +inf, as FlashMLA defines it.

The reference computes in float32 (float64 when q is float64, or when compute_dtype says so) and
returns out in q's dtype. Scheduler metadata (`get_mla_metadata`) is the kernel's business: it is
accepted and not needed.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat

PAGE_BLOCK_SIZE = 64
"""FlashMLA's page size: positions per block of the paged cache."""


def get_mla_metadata(*args, **kwargs) -> tuple[None, None]:
    """FlashMLA's scheduler metadata, which the reference does not need: (None, None)."""
    return None, None


def _integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def check_paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                       cache_seqlens: torch.Tensor, head_dim_v: int) -> None:
    """Raise an error naming the argument, the shape or value found and the one expected."""
    if q.dim() != 4:
        raise ValueError(f"q: expected shape (batch, s_q, h_q, head_dim), found {tuple(q.shape)}")
    b, _, h_q, d = q.shape
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache: expected shape (num_blocks, page_block_size, h_k, head_dim), found "
                         f"{tuple(k_cache.shape)}")
    num_blocks, page, h_k, d_k = k_cache.shape
    if d_k != d:
        raise ValueError(f"k_cache: head_dim {d_k} does not match q's {d} (expected shape ({num_blocks}, {page}, "
                         f"{h_k}, {d}))")
    if h_k == 0 or h_q % h_k:
        raise ValueError(f"k_cache: {h_k} key heads; expected a divisor of q's {h_q} heads (MLA: 1)")
    if not 0 < head_dim_v <= d:
        raise ValueError(f"head_dim_v: found {head_dim_v}, expected 1..{d} (the latent part of each key)")
    if block_table.dim() != 2 or block_table.shape[0] != b or not _integer(block_table):
        raise ValueError(f"block_table: expected an integer tensor of shape ({b}, max_blocks_per_seq), found "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    if tuple(cache_seqlens.shape) != (b,) or not _integer(cache_seqlens):
        raise ValueError(f"cache_seqlens: expected an integer tensor of shape ({b},), found {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    capacity = block_table.shape[1] * page
    for i, n in enumerate(cache_seqlens.tolist()):
        if not 0 <= n <= capacity:
            raise ValueError(f"cache_seqlens: row {i} holds {n} positions, but block_table has room for "
                             f"{block_table.shape[1]} blocks of {page} = {capacity}")
        used = block_table[i, : math.ceil(n / page)]
        bad = (used < 0) | (used >= num_blocks)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise ValueError(f"block_table[{i}, {j}] = {int(used[j])} is outside the pool of {num_blocks} blocks "
                             f"(k_cache.shape[0]); row {i}'s {n} positions need its first {len(used)} entries to "
                             f"name blocks 0..{num_blocks - 1}")


def gather_pages(k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
    """Each sequence's keys in position order: (b, s, h_k, d), s = the longest sequence's blocks * page
    (positions past a sequence's length hold another page's data or page 0: masked by the caller)."""
    page = k_cache.shape[1]
    blocks = max(1, math.ceil(int(cache_seqlens.max()) / page)) if cache_seqlens.numel() else 1
    table = block_table[:, :blocks].long()
    used = torch.arange(blocks, device=table.device) * page < rearrange(cache_seqlens.long(), "b -> b 1")
    table = torch.where(used, table, 0)  # unread entries may hold anything
    return rearrange(k_cache[table], "b nb p h d -> b (nb p) h d")


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, tile_scheduler_metadata=None,
                           num_splits=None, softmax_scale: float | None = None, causal: bool = False,
                           compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over each sequence's paged keys (see the module docstring for every layout).

    softmax_scale defaults to 1 / sqrt(head_dim), FlashMLA's default (DeepSeek-V3 passes its own,
    `dsv3ref.rope.softmax_scale`). Returns out (b, s_q, h_q, head_dim_v) in q's dtype and lse
    (b, h_q, s_q) in float32 (float64 when computing in float64).
    """
    check_paged_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v)
    b, s_q, h_q, d = q.shape
    compute = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    keys = repeat(gather_pages(k_cache, block_table, cache_seqlens).to(compute), "b s hk d -> b s (hk g) d",
                  g=h_q // k_cache.shape[2])  # (b, s, h_q, d): each query head reads its key head
    scores = torch.einsum("bthd,bshd->bhts", q.to(compute), keys) * scale  # (b, h_q, s_q, s)
    s = torch.arange(keys.shape[1], device=q.device)
    seqlens = rearrange(cache_seqlens.long().to(q.device), "b -> b 1 1")
    visible = rearrange(s, "s -> 1 1 s") < seqlens  # (b, 1, s)
    if causal and s_q > 1:  # query j is position seqlen - s_q + j
        last = seqlens - s_q + rearrange(torch.arange(s_q, device=q.device), "t -> 1 t 1")  # (b, s_q, 1)
        visible = visible & (rearrange(s, "s -> 1 1 s") <= last)  # (b, s_q, s)
    scores = scores.masked_fill(~rearrange(visible, "b t s -> b 1 t s"), float("-inf"))
    # The probabilities through torch's softmax, and the log-sum-exp from them: lse = max + log(sum exp(x - max))
    # = max - log(p_max). (torch.exp in float64 was measured wrong by up to 3e-9, relative, in some processes on
    # this machine's CPU, torch 2.13; its softmax was not. Both are exact to rounding elsewhere.)
    peak = scores.amax(dim=-1)  # (b, h_q, s_q): -inf where nothing is visible
    lonely = peak == float("-inf")
    probs = torch.softmax(scores.masked_fill(lonely[..., None], 0.0), dim=-1).masked_fill(lonely[..., None], 0.0)
    lse = torch.where(lonely, float("inf"), peak - probs.amax(dim=-1).log())
    out = torch.einsum("bhts,bshd->bthd", probs, keys[..., :head_dim_v])
    return out.to(q.dtype), lse.to(torch.float64 if compute == torch.float64 else torch.float32)
