"""Chunked prefill: a prompt fed through the cache a bounded number of tokens at a time.

One forward pass over b rows of t positions holds attention scores for b x heads x t x s pairs and
expert buffers for b x t tokens, so prefilling long prompts of a large batch in one pass needs memory
that grows with batch x prompt length (at DeepSeek-V3's size, 32 prompts of 4096 tokens would need
tens of GB of scores on one GPU). Fed in passes of at most `prefill_chunk` tokens (rows x positions),
each pass attends to the cache written by the passes before it, so the result is the same whatever
the chunk size (tests/test_chunking.py), and the peak of one pass is bounded by the chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3ref.cache import KVCache

DEFAULT_PREFILL_CHUNK = 2048
"""Tokens (batch rows x positions) one prefill pass takes at most, unless generate is told otherwise."""


def chunk_width(rows: int, prefill_chunk: int) -> int:
    """Positions per prefill pass for `rows` rows: prefill_chunk tokens in all (at least one position)."""
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk: expected a positive integer (tokens per prefill pass), found "
                         f"{prefill_chunk!r}")
    return max(1, prefill_chunk // rows)


def prefill(step: Callable, ids: torch.Tensor, cache: KVCache, prefill_chunk: int, start: int = 0,
            keep: Callable[[int, torch.Tensor], None] | None = None) -> int:
    """Feed ids (b, L) through the cache from position `start`, at most prefill_chunk tokens a pass.

    step: `model.hidden_states` or a compiled copy. keep(p0, hidden): called with each pass's first
    position and its final-norm hidden states (b, width, dim), for the caller to take what it needs
    (the rows' last positions, or every position for speculative decoding). Returns the passes made.
    """
    width = chunk_width(ids.shape[0], prefill_chunk)
    passes = 0
    for p0 in range(0, ids.shape[1], width):
        hidden = step(ids[:, p0:p0 + width], cache, start + p0)
        if keep is not None:
            keep(p0, hidden)
        passes += 1
    return passes
