"""A paged latent cache: the KV cache as serving engines keep it, and as FlashMLA reads it.

The static `KVCache` gives every row max_seq_len positions up front. Here positions live in pages of
64 (`PAGE_BLOCK_SIZE`) drawn from one pool shared by every row: a row takes a page when it grows past
its last one and gives all of them back when its sequence ends (`free`), so rows of very different
lengths share memory by what they use.

    pool, one per layer: kv (num_blocks, 64, 1, kv_lora_rank + qk_rope_head_dim)
                         each position [ c^KV | k^R ], the absorbed cache of dsv3ref.cache
    block_table (batch, max_seq_len / 64) int32, shared by the layers: row b's position p is in
                         page block_table[b, p // 64], slot p % 64 (-1: no page yet)

Attention over it is `dsv3ref.kernels.flash_mla_with_kvcache` (or the function given to
`dsv3ref.kernels.use(mla_decode=...)`): the absorbed query [W^UK q^C | q^R] against the pages.
Only attn_impl="absorb" has a latent to page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv3ref.config import ModelConfig
from dsv3ref.kernels.mla_decode import PAGE_BLOCK_SIZE


@dataclass
class PagedLayer:
    """One layer's view of a PagedKVCache: its page pool and the shared block table."""

    kv: torch.Tensor
    """(num_blocks, page_block_size, 1, kv_lora_rank + qk_rope_head_dim)"""
    cache: PagedKVCache

    @property
    def block_table(self) -> torch.Tensor:
        return self.cache.block_table

    def store(self, positions: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Write the chunk's latents c_kv (b, t, r) and rotary keys k_rope (b, t, dr) at positions (b, t)."""
        page = self.kv.shape[1]
        pages = self.block_table.long().gather(1, positions // page)  # (b, t)
        slots = (pages * page + positions % page).flatten()  # (b t,)
        flat = self.kv.view(-1, self.kv.shape[-1])  # (num_blocks * page, r + dr)
        flat[slots] = torch.cat([c_kv, k_rope], dim=-1).flatten(0, 1).to(self.kv.dtype)


class PagedKVCache:
    """Paged latent caches for every layer (and MTP module), one block table and one free list."""

    attn_impl = "absorb"

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int, num_blocks: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n_layers: int | None = None,
                 page_block_size: int = PAGE_BLOCK_SIZE):
        for name, value in (("batch_size", batch_size), ("max_seq_len", max_seq_len),
                            ("page_block_size", page_block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, found {value!r}")
        if max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len: found {max_seq_len}, expected at most max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        per_row = math.ceil(max_seq_len / page_block_size)
        num_blocks = batch_size * per_row if num_blocks is None else num_blocks
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks: expected a positive integer, found {num_blocks!r}")
        self.batch_size, self.max_seq_len, self.num_blocks = batch_size, max_seq_len, num_blocks
        self.page_block_size = page_block_size
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.layers = [PagedLayer(torch.zeros(num_blocks, page_block_size, 1, width, dtype=dtype, device=device), self)
                       for _ in range(cfg.num_hidden_layers if n_layers is None else n_layers)]
        self.block_table = torch.full((batch_size, per_row), -1, dtype=torch.int32, device=device)
        self.free_blocks = list(range(num_blocks))
        """Pages no row holds, taken lowest first."""
        self.filled = torch.zeros(len(self.layers), batch_size, dtype=torch.long, device=device)
        """(layers, batch): leading positions of each row each layer has written (as KVCache.filled)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].kv.dtype

    @property
    def device(self) -> torch.device:
        return self.filled.device

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one layer's tensors."""
        return {"kv": tuple(self.layers[0].kv.shape)}

    def blocks_held(self, row: int) -> int:
        return int((self.block_table[row] >= 0).sum())

    def reserve(self, positions: torch.Tensor) -> None:
        """Give each row the pages its positions (b, t) reach, from the free list: all of them, or none
        (an error naming the row, when the pool cannot hold them)."""
        need = ((positions.max(dim=1).values + self.page_block_size) // self.page_block_size).tolist()
        missing = [(row, j) for row, blocks in enumerate(need) for j in range(self.blocks_held(row), blocks)]
        if len(missing) > len(self.free_blocks):
            row, j = missing[len(self.free_blocks)]
            raise ValueError(f"cache: the pool of {self.num_blocks} blocks of {self.page_block_size} positions is "
                             f"used up (row {row} needs its block {j}); free the rows whose sequences ended "
                             "(cache.free(row)) or make the cache with a larger num_blocks")
        for row, j in missing:
            self.block_table[row, j] = self.free_blocks.pop(0)

    def free(self, row: int) -> None:
        """Row `row`'s sequence ended: its pages return to the pool, and the row starts empty."""
        if not 0 <= row < self.batch_size:
            raise ValueError(f"row: expected 0..{self.batch_size - 1}, found {row}")
        held = self.block_table[row]
        self.free_blocks = sorted(self.free_blocks + held[held >= 0].tolist())
        held.fill_(-1)
        self.filled[:, row] = 0

    def mark_filled(self, layers: range, positions: torch.Tensor) -> None:
        """Record that `layers` wrote positions (b, t) of each row."""
        end = positions[:, -1] + 1
        self.filled[layers.start:layers.stop] = torch.maximum(self.filled[layers.start:layers.stop], end)

    @property
    def nbytes(self) -> int:
        """Bytes of the page pools (the block table aside)."""
        return sum(layer.kv.numel() * layer.kv.element_size() for layer in self.layers)

    def __repr__(self) -> str:
        return (f"PagedKVCache(batch_size={self.batch_size}, max_seq_len={self.max_seq_len}, num_blocks="
                f"{self.num_blocks}, free={len(self.free_blocks)}, layers={len(self.layers)}, nbytes={self.nbytes:,})")
