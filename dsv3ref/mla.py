"""Multi-head Latent Attention (DeepSeek-V3 report, section 2.1.1, eqs. 1-11), plain form.

Keys and values are not projected from the hidden state directly: the hidden state h_t is first
compressed into one small latent per token,

    c_t^KV = W^DKV h_t                    (eq. 1; kv_a_proj_with_mqa, then kv_a_layernorm)

and every head's key and value are expanded from it,

    k_t^C = W^UK c_t^KV,  v_t^C = W^UV c_t^KV          (eqs. 2, 5; the two halves of kv_b_proj)

Position enters only through a small rotary key shared by all heads,

    k_t^R = RoPE(W^KR h_t)                (eq. 3; the last qk_rope_head_dim outputs of kv_a_proj_with_mqa)

and the key of head i is [k_{t,i}^C ; k_t^R]. Queries are built the same way from their own latent
c_t^Q (eqs. 6-9; q_a_proj, q_a_layernorm, q_b_proj), or from h_t directly when q_lora_rank is None.

This module is the readable oracle: it expands per-head keys and values and attends as ordinary
multi-head attention does.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import nn

from dsv3ref.config import ModelConfig
from dsv3ref.norm import RMSNorm
from dsv3ref.rope import apply_rope, softmax_scale

ATTN_IMPLS = ("naive",)


class MLA(nn.Module):
    """Multi-head latent attention over one sequence chunk, with the checkpoint's projection names."""

    def __init__(self, cfg: ModelConfig, attn_impl: str = "naive"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: found {attn_impl!r}, expected one of {ATTN_IMPLS}")
        self.attn_impl = attn_impl
        self.n_heads = cfg.num_attention_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = softmax_scale(cfg)
        h, dim, qk = cfg.num_attention_heads, cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, dim, bias=cfg.attention_bias)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, dim) -> q_nope (b, t, h, qk_nope_head_dim), q_rope (b, t, h, qk_rope_head_dim), rotated."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = rearrange(q, "b t (h d) -> b t h d", h=self.n_heads)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, rearrange(cos, "b t p -> b t 1 p"), rearrange(sin, "b t p -> b t 1 p"))
        return q_nope, q_rope

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, dim) -> normalized latent c_kv (b, t, kv_lora_rank), rotated shared key k_rope (b, t, rope)."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_rope, cos, sin)

    def expand(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv (b, s, kv_lora_rank) -> k_nope (b, s, h, qk_nope_head_dim), v (b, s, h, v_head_dim)."""
        kv = rearrange(self.kv_b_proj(c_kv), "b s (h d) -> b s h d", h=self.n_heads)
        return kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend over the chunk itself.

        x: (b, t, dim); cos, sin: (b, t, rope/2) for the chunk's positions;
        mask: (b, t, s) bool, True where query t may see key s. Returns (b, t, dim).
        """
        q_nope, q_rope = self.query(x, cos, sin)
        c_kv, k_rope = self.latent(x, cos, sin)
        k_nope, v = self.expand(c_kv)
        return self.o_proj(self.attend(q_nope, q_rope, k_nope, k_rope, v, mask))

    def attend(self, q_nope, q_rope, k_nope, k_rope, v, mask) -> torch.Tensor:
        """Softmax attention with per-head keys [k_nope ; k_rope] (eqs. 10-11).

        q_nope (b, t, h, dn), q_rope (b, t, h, dr), k_nope (b, s, h, dn), k_rope (b, s, dr),
        v (b, s, h, dv), mask (b, t, s) -> (b, t, h * dv).
        """
        scores = einsum(q_nope, k_nope, "b t h d, b s h d -> b h t s") + einsum(
            q_rope, k_rope, "b t h d, b s d -> b h t s")
        scores = scores * self.softmax_scale
        compute = torch.promote_types(scores.dtype, torch.float32)
        scores = scores.to(compute).masked_fill(~rearrange(mask, "b t s -> b 1 t s"), float("-inf"))
        probs = scores.softmax(dim=-1).to(v.dtype)
        out = einsum(probs, v, "b h t s, b s h d -> b t h d")
        return rearrange(out, "b t h d -> b t (h d)")
