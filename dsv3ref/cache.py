"""Static, preallocated KV caches, and what they cost per token.

MLA's point for inference (DeepSeek-V2 report, section 2.1.2; V3 report, section 2.1.1): a token's
whole key-value state is the normalized latent c^KV (kv_lora_rank numbers) plus the shared rotary key
k^R (qk_rope_head_dim numbers), 512 + 64 = 576 numbers per layer in DeepSeek-V3, whatever the number
of heads. A cache of per-head keys and values (what multi-head attention must keep, and what the
naive path of dsv3ref keeps) holds n_h * (d_qk + d_v) = 128 * (192 + 128) = 40960 numbers per layer.

`KVCache` is allocated once for `max_seq_len` positions and written in place; position p of row b
lives at index p. Nothing is ever shifted, and a write past `max_seq_len` is an error.
"""

from __future__ import annotations

import math

import torch

from dsv3ref.config import ModelConfig
from dsv3ref.impl import CHOICES, check_choice


def cache_shapes(cfg: ModelConfig, attn_impl: str, batch_size: int, max_seq_len: int, heads: int | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's cache tensors for attention implementation `attn_impl`. heads: the
    attention heads this process computes (default all; fewer when heads are split across processes)."""
    b, s, h = batch_size, max_seq_len, heads or cfg.num_attention_heads
    if check_choice("attn_impl", attn_impl) == "absorb":
        return {"c_kv": (b, s, cfg.kv_lora_rank), "k_rope": (b, s, cfg.qk_rope_head_dim)}
    return {"k": (b, s, h, cfg.qk_head_dim), "v": (b, s, h, cfg.v_head_dim)}


class KVCache:
    """One preallocated cache per decoder layer (and per MTP module, when the model has them), for
    the attention implementation that fills it:

    attn_impl "absorb": the latent, per layer `c_kv` (batch, max_seq_len, kv_lora_rank) and `k_rope`
    (batch, max_seq_len, qk_rope_head_dim);
    attn_impl "naive": per-head keys and values, per layer `k` (batch, max_seq_len, heads, qk_head_dim)
    and `v` (batch, max_seq_len, heads, v_head_dim).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int, attn_impl: str,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n_layers: int | None = None,
                 heads: int | None = None):
        for name, value in (("batch_size", batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, found {value!r}")
        if max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len: found {max_seq_len}, expected at most max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        shapes = cache_shapes(cfg, attn_impl, batch_size, max_seq_len, heads)
        self.attn_impl = attn_impl
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.layers: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in shapes.items()}
            for _ in range(cfg.num_hidden_layers if n_layers is None else n_layers)
        ]
        self.filled = torch.zeros(len(self.layers), batch_size, dtype=torch.long, device=device)
        """(layers, batch): how many leading positions of each row each layer has written. A chunk may
        start at any position up to this (earlier ones are rewritten, as speculative decoding does)."""
        # The cache is written in place by compiled steps: marked as fixed addresses, CUDA graphs
        # (mode="reduce-overhead") may replay over it; unmarked, inductor skips CUDA graphs for a graph
        # that mutates its inputs (seen on an H200). guard=False: a new cache re-records, not recompiles.
        for t in [*(t for layer in self.layers for t in layer.values()), self.filled]:
            torch._dynamo.mark_static_address(t, guard=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0][next(iter(self.layers[0]))].dtype

    @property
    def device(self) -> torch.device:
        return self.filled.device

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one layer's tensors."""
        return {name: tuple(t.shape) for name, t in self.layers[0].items()}

    def mark_filled(self, layers: range, positions: torch.Tensor) -> None:
        """Record that `layers` wrote positions (b, t) of each row (contiguous, increasing)."""
        end = positions[:, -1] + 1  # (b,)
        self.filled[layers.start:layers.stop] = torch.maximum(self.filled[layers.start:layers.stop], end)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def __repr__(self) -> str:
        return (f"KVCache(attn_impl={self.attn_impl!r}, batch_size={self.batch_size}, max_seq_len={self.max_seq_len}, "
                f"layers={len(self.layers)}, nbytes={self.nbytes:,})")


def kv_cache_bytes(cfg: ModelConfig, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of KV cache for one sequence of `seq_len` tokens across all decoder layers, per attn_impl.

    "absorb": the latent cache, (kv_lora_rank + qk_rope_head_dim) numbers per token and layer;
    "naive": per-head keys and values as multi-head attention caches them,
    heads * (qk_head_dim + v_head_dim) numbers per token and layer.
    """
    size = torch.empty((), dtype=dtype).element_size()
    per_token_layer = {impl: sum(math.prod(shape) for shape in cache_shapes(cfg, impl, 1, 1).values())
                       for impl in CHOICES["attn_impl"]}
    return {k: v * seq_len * cfg.num_hidden_layers * size for k, v in per_token_layer.items()}
