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

Two implementations share these weights:

- "naive", the readable oracle: expand per-head keys and values from the latent and attend as
  multi-head attention does (its cache holds the expanded keys and values);
- "absorb", what MLA is for at inference: since q_i . k_i^C = q_i^C . (W^UK_i c) = (W^UK_i^T q_i^C) . c,
  the key half of kv_b_proj is folded into the query ("absorbed") and scores are taken directly
  against the cached latent c; likewise o_i = sum_s p_s W^UV_i c_s = W^UV_i (sum_s p_s c_s), so the
  value half is applied once, after attention. The cache holds only c^KV and k^R (see dsv3ref.cache).

Absorption is not free: each score then costs 2 * kv_lora_rank + qk_rope_head_dim multiply-adds
instead of qk_head_dim + v_head_dim. Decoding (one query, many cached keys) wins by far; prefill
(as many queries as keys) is cheaper with the keys expanded. So "absorb" can compute a chunk in
either order over the same latent cache: "absorbed" (DeepSeek's absorb path) or "expanded" (keys
and values expanded from the latent, through torch's fused scaled_dot_product_attention).
`attn_order` chooses: "absorbed" or "expanded" force one; "auto" (the default) takes the cheaper
one by a multiply-add count when activations are float32 or float64 and the weights dense, where
both orders agree to float rounding (about 1e-7). Otherwise it takes the absorbed order for every
chunk: in bf16 the two orders round different intermediates (the expanded keys or the absorbed
query), and with FP8 weights a last-bit difference can round an FP8 GEMM's input to another E4M3
value, so switching orders by chunk size would make results depend on how the input is chunked
(by 6e-3 to 6e-2 on the logits of a tiny model, measured).

FP8 weights (`gemm_impl="fp8"`): which path an engineer should compare against.

- "naive" is DeepSeek's naive path (inference/model.py, attn_impl="naive"): kv_b_proj runs as the
  block-scaled FP8 GEMM, so the latent c^KV is quantized in 1 x 128 tiles before the expansion.
- "absorb" is DeepSeek's absorb path: kv_b_proj's weight is dequantized (`linear_weight`) and
  applied to the latent in the activation dtype; the latent is never quantized, in either order.

The two therefore differ by the latent's quantization error (a few percent on the attention
output of a tiny model); each is independent of how the input is chunked or batched, and the
tests hold each equal to its formula written out in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import nn

from dsv3ref.config import ModelConfig
from dsv3ref.fp8 import FP8Linear, linear_weight
from dsv3ref.impl import CHOICES, Implementation
from dsv3ref.kernels.mla_decode import flash_mla_with_kvcache
from dsv3ref.linear import Linear
from dsv3ref.memo import derived
from dsv3ref.norm import RMSNorm
from dsv3ref.paged_cache import PagedLayer
from dsv3ref.rope import apply_rope, softmax_scale
from dsv3ref.swap import current

ATTN_IMPLS, ORDERS = CHOICES["attn_impl"], CHOICES["attn_order"]  # the vocabulary's values (dsv3ref.impl)


def absorbed_is_cheaper(t: int, s: int, r: int, h: int, dn: int, dr: int, dv: int) -> bool:
    """Whether t queries over s latent keys cost fewer multiply-adds absorbed than expanded.

    expanded: kv_b_proj on s latents + per-head attention  = h * (s*r*(dn+dv) + t*s*(dn+dr+dv))
    absorbed: W^UK into t queries, latent scores and output, W^UV on t outputs
                                                            = h * (t*r*(dn+dv) + t*s*(2*r+dr))
    """
    return t * r * (dn + dv) + t * s * (2 * r + dr) < s * r * (dn + dv) + t * s * (dn + dr + dv)


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mask (b, t, s) as an additive bias: 0 where True, -inf where False, in dtype (made once per mask)."""
    return derived(mask, ("bias", dtype), lambda: torch.zeros(mask.shape, dtype=dtype, device=mask.device)
                   .masked_fill_(~mask, float("-inf")))


def _plainly_causal(mask: torch.Tensor) -> bool:
    """Whether mask (b, t, s) is the causal mask of a chunk without a cache (t == s, query i sees keys
    0..i in every row): then torch's fused attention may skip the masked blocks instead of reading the
    mask. Checked once per mask. Only on a CPU, where the two calls were measured and give the same
    bits (on a GPU the check would wait for the device); a mask without values (fake or meta tensors:
    a simulation) or one seen while torch.compile traces is taken as it is."""
    if type(mask) is not torch.Tensor or mask.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    t, s = mask.shape[-2:]
    return t == s and derived(mask, "causal", lambda: torch.equal(
        mask, torch.ones(t, s, dtype=torch.bool, device=mask.device).tril().expand_as(mask)))


class MLA(nn.Module):
    """Multi-head latent attention over one sequence chunk, with the checkpoint's projection names."""

    def __init__(self, cfg: ModelConfig, attn_impl: str = "naive", attn_order: str = "auto"):
        super().__init__()
        Implementation(attn_impl=attn_impl, attn_order=attn_order)  # checks both
        self.attn_impl = attn_impl
        self.attn_order = attn_order  # for attn_impl="absorb": the order a chunk is computed in
        self.n_heads = cfg.num_attention_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = softmax_scale(cfg)
        h, dim, qk = cfg.num_attention_heads, cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(dim, h * qk, bias=False)
        else:
            self.q_a_proj = Linear(dim, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(h * cfg.v_head_dim, dim, bias=cfg.attention_bias)

    @property
    def order(self) -> str:
        """The former name of attn_order (read-only: change it with model.set_attn_order)."""
        return self.attn_order

    @order.setter
    def order(self, value: str) -> None:
        raise AttributeError(f"MLA.order is now attn_order, chosen with the model: DeepseekV3(..., "
                             f"attn_order={value!r}) or model.set_attn_order({value!r})")

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
        """c_kv (b, s, kv_lora_rank) -> k_nope (b, s, h, qk_nope_head_dim), v (b, s, h, v_head_dim).

        "naive" runs kv_b_proj as a layer (with FP8 weights: the FP8 GEMM, latent quantized);
        "absorb" multiplies by its dense weight (dequantized once), as its absorbed order does.
        """
        if self.attn_impl == "naive":
            kv = self.kv_b_proj(c_kv)
        else:
            kv = F.linear(c_kv, linear_weight(self.kv_b_proj, c_kv.dtype))  # (b, s, h * (dn + dv))
        kv = rearrange(kv, "b s (h d) -> b s h d", h=self.n_heads)
        return kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: dict[str, torch.Tensor] | PagedLayer | None = None,
    ) -> torch.Tensor:
        """Attention for a chunk of t new tokens.

        x: (b, t, dim); cos, sin: (b, t, rope/2) at the chunk's positions.
        Without a cache the keys are the chunk itself and mask is (b, t, t). With a cache (one
        layer's tensors of a `KVCache`), the chunk's keys are first written at `positions` (b, t),
        then the keys at cache indices 0..s-1 are attended, with mask (b, t, s).
        True in mask means query t may see key s. With a paged cache (one layer of a `PagedKVCache`) the
        chunk's latents are written into its pages and attention is the FlashMLA-shaped op over them
        (`attend_paged`; the chunk is causal by its positions, mask is not read). Returns (b, t, dim).
        """
        q_nope, q_rope = self.query(x, cos, sin)
        c_kv, k_rope = self.latent(x, cos, sin)
        if isinstance(cache, PagedLayer):
            cache.store(positions, c_kv, k_rope)
            return self.o_proj(self.attend_paged(q_nope, q_rope, cache, positions))
        if self.attn_impl == "naive":
            k, v = self.expand_keys(c_kv, k_rope)
            if cache is not None:
                k, v = self._store(cache, positions, mask.shape[-1], k=k, v=v)
            out = self.attend_naive(torch.cat([q_nope, q_rope], dim=-1), k, v, mask)
        else:
            if cache is not None:
                c_kv, k_rope = self._store(cache, positions, mask.shape[-1], c_kv=c_kv, k_rope=k_rope)
            if self._absorbed(q_nope.shape[1], c_kv.shape[1], c_kv.dtype):
                out = self.attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask)
            else:
                out = self.attend_fused(torch.cat([q_nope, q_rope], dim=-1), *self.expand_keys(c_kv, k_rope), mask)
        return self.o_proj(out)

    def expand_keys(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv (b, s, r), k_rope (b, s, dr) -> per-head keys [k^C ; k^R] (b, s, h, dn + dr), values (b, s, h, dv)."""
        k_nope, v = self.expand(c_kv)
        return torch.cat([k_nope, repeat(k_rope, "b s d -> b s h d", h=self.n_heads)], dim=-1), v

    def _absorbed(self, t: int, s: int, dtype: torch.dtype) -> bool:
        """Whether a chunk of t queries over s keys is computed in the absorbed order (see `attn_order`)."""
        if self.attn_order != "auto":
            return self.attn_order == "absorbed"
        # The orders agree to float32 rounding. That is harmless only if nothing downstream magnifies a
        # last-bit difference: a narrower dtype rounds the orders' different intermediates, and an FP8
        # GEMM can round its input to a different E4M3 value. There, one order for every chunk.
        if dtype not in (torch.float32, torch.float64) or isinstance(self.kv_b_proj, FP8Linear):
            return True
        return absorbed_is_cheaper(t, s, self.kv_lora_rank, self.n_heads, self.qk_nope_head_dim,
                                   self.qk_rope_head_dim, self.v_head_dim)

    @staticmethod
    def _store(cache: dict[str, torch.Tensor], positions: torch.Tensor, end: int, **new: torch.Tensor):
        """Write each new (b, t, ...) tensor at cache[name][row, positions[row, j]]; return the prefixes
        cache[name][:, :end]."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # (b, 1)
        for name, value in new.items():
            cache[name][rows, positions] = value.to(cache[name].dtype)
        return tuple(cache[name][:, :end] for name in new)

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """scores (b, h, t, s) * softmax_scale, masked by mask (b, t, s), softmax over s in >= float32."""
        compute = torch.promote_types(scores.dtype, torch.float32)
        if torch.is_grad_enabled() and scores.requires_grad:
            # Training: the mask as a bias (0 or -inf, made once for all heads) added in place to the
            # scaled scores: the same numbers as below for finite scores, in two light passes forward and
            # one multiply backward instead of a multiply, a fill and a fill of the gradient
            # (benchmarks/train_step.py; one fused `torch.add(bias, scores, alpha=scale)` measured slower,
            # its broadcast with alpha 1.2 ms against 0.8 ms for the two passes on tiny's 16 x 4 x 128 x 128).
            # (A NaN or +inf score under the mask reaches the row here; in training it has already reached
            # the loss.)
            scores = (scores.to(compute) * self.softmax_scale).add_(
                rearrange(_mask_bias(mask, compute), "b t s -> b 1 t s"))
        else:  # (the cast inline: its copy is freed before masked_fill allocates; dsv3ref.simulate's peaks)
            scores = (scores.to(compute) * self.softmax_scale).masked_fill(
                ~rearrange(mask, "b t s -> b 1 t s"), float("-inf"))
        return scores.softmax(dim=-1).to(dtype)

    def attend_naive(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Multi-head attention with per-head keys [k^C ; k^R] (eqs. 10-11).

        q (b, t, h, qk_head_dim), k (b, s, h, qk_head_dim), v (b, s, h, v_head_dim), mask (b, t, s)
        -> (b, t, h * v_head_dim).
        """
        probs = self._softmax(einsum(q, k, "b t h d, b s h d -> b h t s"), mask, v.dtype)
        return rearrange(einsum(probs, v, "b h t s, b s h d -> b t h d"), "b t h d -> b t (h d)")

    def attend_fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`attend_naive` through torch's fused scaled_dot_product_attention (same shapes, same result
        up to float rounding; it never materializes the float32 score matrix twice)."""
        dv = v.shape[-1]
        # torch's fused kernels want values as wide as the keys; zero columns add zero columns to the
        # output, which are cut off again.
        if dv < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))
        causal = _plainly_causal(mask)  # (the same numbers: a masked key adds exp(-inf) = 0 either way)
        out = F.scaled_dot_product_attention(
            rearrange(q, "b t h d -> b h t d"), rearrange(k, "b s h d -> b h s d"), rearrange(v, "b s h d -> b h s d"),
            attn_mask=None if causal else rearrange(mask, "b t s -> b 1 t s"), is_causal=causal,
            scale=self.softmax_scale)
        return rearrange(out[..., :dv], "b h t d -> b t (h d)")

    def attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask) -> torch.Tensor:
        """The same attention computed against the latent, with W^UK and W^UV absorbed.

        q_nope (b, t, h, dn), q_rope (b, t, h, dr), c_kv (b, s, r), k_rope (b, s, dr), mask (b, t, s)
        -> (b, t, h * dv). Costs O(s * h * (r + dr)) per query instead of expanding s keys and values.
        """
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)
        q_latent = einsum(q_nope, w_uk, "b t h d, h d r -> b t h r")  # the query, moved into latent space
        scores = einsum(q_latent, c_kv, "b t h r, b s r -> b h t s") + einsum(
            q_rope, k_rope, "b t h d, b s d -> b h t s")
        probs = self._softmax(scores, mask, c_kv.dtype)
        out_latent = einsum(probs, c_kv, "b h t s, b s r -> b t h r")  # attention output, still latent
        out = einsum(out_latent, w_uv, "b t h r, h d r -> b t h d")
        return rearrange(out, "b t h d -> b t (h d)")

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK (h, dn, r) and W^UV (h, dv, r): kv_b_proj's two halves per head, dense in `dtype`."""
        # kv_b_proj's rows are head-major: (h (dn + dv)) -> (h, dn + dv, r). (unflatten rather than einops
        # here: einops' type cache would record the Parameter class while torch.compile traces it.)
        w = linear_weight(self.kv_b_proj, dtype).unflatten(0, (self.n_heads, -1))
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def attend_paged(self, q_nope, q_rope, cache: PagedLayer, positions: torch.Tensor) -> torch.Tensor:
        """Absorbed attention of the chunk over its rows' pages, through FlashMLA's interface.

        q_nope (b, t, h, dn), q_rope (b, t, h, dr), positions (b, t) consecutive per row, already stored
        -> (b, t, h * dv). The query [W^UK q^C | q^R] (b, t, h, r + dr) attends to each row's first
        positions[:, -1] + 1 cached positions, causally (the chunk is the last t of them); the latent
        output (b, t, h, r) is then multiplied by W^UV. The op is dsv3ref.kernels.flash_mla_with_kvcache
        unless `dsv3ref.kernels.use(mla_decode=...)` names another.
        """
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)
        q = torch.cat([einsum(q_nope, w_uk, "b t h d, h d r -> b t h r"), q_rope], dim=-1)  # (b, t, h, r + dr)
        seqlens = (positions[:, -1] + 1).to(torch.int32)  # (b,)
        op = current().mla_decode or flash_mla_with_kvcache
        out_latent, _ = op(q, cache.kv, cache.block_table, seqlens, self.kv_lora_rank, None, None,
                           softmax_scale=self.softmax_scale, causal=True)  # (b, t, h, r)
        out = einsum(out_latent, w_uv, "b t h r, h d r -> b t h d")
        return rearrange(out, "b t h d -> b t (h d)")
