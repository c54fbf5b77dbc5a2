# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Multi-head Latent Attention and its cache
#
# *Lesson 2 of the dsv3ref course (lessons 00 to 11), after [01_rope_yarn](01_rope_yarn.ipynb) (Rotary
# positions and YaRN).*
#
# **What this notebook teaches.** How MLA compresses every token's keys and values into one small
# latent vector, why the rotary part of the key has to be kept apart, how the up-projections can be
# *absorbed* so that decoding attends directly to the cached latents, and what that buys: a KV cache
# of 576 numbers per token and layer instead of 40,960, and a decode step that reads 576 numbers per
# cached token and layer instead of 40,960. The step still grows linearly with the context (every
# cached latent is read; the count below says how much), only with a far smaller constant: the
# timings here stop at 2,048 tokens, where that growth is hard to see, not absent.
#
# Two facts this notebook does not measure, from the reports: MLA is not a quality trade-off: in
# DeepSeek-V2 (Appendix D.2) MLA scored better than standard multi-head attention while caching far
# less. And the *query* is compressed too (`q_lora_rank` = 1536), not for the cache (queries are not
# cached) but to reduce activation memory in training (DeepSeek-V3 §2.1.1).
#
# Report sections: DeepSeek-V3 §2.1.1 (eqs. 1-11); DeepSeek-V2 §2.1 (the cache comparison, Table 1).

# %%
import time

import matplotlib.pyplot as plt
import torch
from einops import einsum, rearrange

from dsv3ref import DeepseekV3, ModelConfig, kv_cache_bytes
from dsv3ref.rope import RotaryEmbedding

_ = torch.manual_seed(0)
torch.set_num_threads(2)

# %% [markdown]
# ## 1. The latent and the decoupled rotary key
#
# One attention layer of the tiny model. `kv_a_proj_with_mqa` maps the hidden state $h_t$ to
# $[c_t^{KV}; k_t^R]$: the latent (eq. 1) and one rotary key shared by all heads (eq. 3). The latent
# is then normalized by `kv_a_layernorm`: eq. 1 has no norm; it is one of the extra RMSNorm layers
# after the compressed latents that the report lists in its architecture details (section 4.2). `kv_b_proj` expands the latent into every head's position-free key $k^C$ and
# value $v$ (eqs. 2, 5).

# %%
cfg = ModelConfig.preset("tiny")
model = DeepseekV3(cfg, attn_impl="absorb").double().eval()
attn = model.model.layers[0].self_attn
x = torch.randn(1, 6, cfg.hidden_size, dtype=torch.float64)   # (batch, tokens, hidden)
cos, sin = RotaryEmbedding(cfg)(torch.arange(6)[None], torch.float64)

c_kv, k_rope = attn.latent(x, cos, sin)            # what the cache stores
k_nope, v = attn.expand(c_kv)                       # what multi-head attention would store
q_nope, q_rope = attn.query(x, cos, sin)
for name, t in [("c_kv", c_kv), ("k_rope", k_rope), ("k_nope", k_nope), ("v", v), ("q_nope", q_nope),
                ("q_rope", q_rope)]:
    print(f"{name:7s} {tuple(t.shape)}")

# %% [markdown]
# Why a separate rotary key? RoPE multiplies the key of position $s$ by a rotation $R_s$. If the
# whole key were rotated, $q_t^\top R_t^\top R_s W^{UK} c_s$ would put a position-dependent matrix
# between the query and $W^{UK}$, and $W^{UK}$ could no longer be folded into the query once for all
# positions. So DeepSeek rotates only a small extra part ($d_h^R = 64$ channels, from $h_t$ directly)
# and leaves $k^C$ position-free.

# %% [markdown]
# ## 2. The absorption identity
#
# For head $i$: $q_i^C \cdot k_{i,s}^C = q_i^C \cdot (W^{UK}_i c_s) = (W^{UK\top}_i q_i^C) \cdot c_s$, and
# $\sum_s p_s\, W^{UV}_i c_s = W^{UV}_i \sum_s p_s c_s$. The left sides need every cached latent expanded
# per head; the right sides touch each cached latent once, in its 512-dimensional (here 32) space.

# %%
w = rearrange(attn.kv_b_proj.weight, "(h d) r -> h d r", h=cfg.num_attention_heads)
w_uk, w_uv = w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

scores_expanded = einsum(q_nope, k_nope, "b t h d, b s h d -> b h t s")
q_latent = einsum(q_nope, w_uk, "b t h d, h d r -> b t h r")          # W^UK folded into the query
scores_absorbed = einsum(q_latent, c_kv, "b t h r, b s r -> b h t s")
score_gap = (scores_expanded - scores_absorbed).abs().max().item()

p = torch.softmax(torch.randn(1, cfg.num_attention_heads, 6, 6, dtype=torch.float64), -1)
out_expanded = einsum(p, v, "b h t s, b s h d -> b t h d")
out_absorbed = einsum(einsum(p, c_kv, "b h t s, b s r -> b t h r"), w_uv, "b t h r, h d r -> b t h d")
value_gap = (out_expanded - out_absorbed).abs().max().item()
print(f"max score difference {score_gap:.1e}, max output difference {value_gap:.1e} (float64)")

# %% [markdown]
# ## 3. Cache size per token
#
# Per token and layer, in numbers (DeepSeek-V2 report, Table 1), with DeepSeek-V3's sizes:
# $n_h = 128$ heads of $d_h = 128$. MHA caches $2 n_h d_h$; GQA with $n_g$ groups $2 n_g d_h$; MQA
# $2 d_h$; MLA $d_c + d_h^R = 512 + 64$, the same as GQA with 2.25 groups (the V2 report's comparison). (DeepSeek-V3's keys are
# 192 wide, so its MHA-equivalent cache is a little larger still: the naive column of `kv_cache_bytes`.)

# %%
v3 = ModelConfig.preset("deepseek-v3")
d_h, n_h, layers = 128, v3.num_attention_heads, v3.num_hidden_layers
per_layer = {"MHA": 2 * n_h * d_h, "GQA (8 groups)": 2 * 8 * d_h, "MQA": 2 * d_h,
             "MLA": v3.kv_lora_rank + v3.qk_rope_head_dim}
for name, n in per_layer.items():
    print(f"{name:15s} {n:6d} numbers/token/layer  {n / d_h:6.2f} d_h   "
          f"{n * layers * 2 / 1024:8.1f} KiB/token over {layers} layers in bf16")
mla_bytes = kv_cache_bytes(v3, 1, torch.bfloat16)
print(f"kv_cache_bytes(deepseek-v3, 1 token, bf16): {mla_bytes}")
print(f"128K tokens of context: MLA {kv_cache_bytes(v3, 131072)['absorb'] / 2**30:.1f} GiB, "
      f"naive {kv_cache_bytes(v3, 131072)['naive'] / 2**30:.0f} GiB")

# %% [markdown]
# ## 4. Decode time against context
#
# Three ways to decode one token after $s$ cached tokens, on a model with DeepSeek-like attention
# proportions (32 heads, latent 256, one token per step):
#
# - **absorbed** (`attn_impl="absorb"`): latent cache, scores against the latents;
# - **re-expanded**: the same latent cache, but every cached latent is pushed through `kv_b_proj` at
#   every step (what Hugging Face transformers does);
# - **naive** (`attn_impl="naive"`): per-head keys and values cached, nothing recomputed, at many
#   times the memory.
#
# Only the decode step is timed; the caches are filled with random values (their content does not
# change the cost).

# %%
bench_cfg = ModelConfig.preset("small").replace(num_hidden_layers=2, vocab_size=1000, hidden_size=512,
                                                intermediate_size=1024, n_routed_experts=8, n_group=4)
bench = DeepseekV3(bench_cfg, attn_impl="absorb").eval()
naive = DeepseekV3(bench_cfg, attn_impl="naive").eval()
naive.load_state_dict(bench.state_dict())
contexts = [128, 512, 1024, 2048]


def decode_ms(model, order, context, steps=4):
    # the fastest of a few decode steps: the minimum is robust to a busy machine
    model.set_attn_order(order)
    cache = model.new_cache(1, context + 1)
    for layer in cache.layers:  # random latents stand in for a prefill of `context` tokens
        for t in layer.values():
            t.normal_()
    cache.filled.fill_(context)
    token = torch.tensor([[1]])
    best = float("inf")
    with torch.inference_mode():
        model(token, cache, context)  # warm-up
        for _ in range(steps):
            start = time.perf_counter()
            model(token, cache, context)
            best = min(best, time.perf_counter() - start)
    return 1e3 * best


h, r = bench_cfg.num_attention_heads, bench_cfg.kv_lora_rank
dn, dr, dv = bench_cfg.qk_nope_head_dim, bench_cfg.qk_rope_head_dim, bench_cfg.v_head_dim
# multiply-adds of attention per decode step and layer (one query, s cached tokens), counted from the shapes
work = {"absorbed": [h * (r * (dn + dv) + s * (2 * r + dr)) for s in contexts],
        "re-expanded": [h * (s * r * (dn + dv) + s * (dn + dr + dv)) for s in contexts],
        "naive (full cache)": [h * (r * (dn + dv) + s * (dn + dr + dv)) for s in contexts]}
times = {"absorbed": [decode_ms(bench, "absorbed", c) for c in contexts],
         "re-expanded": [decode_ms(bench, "expanded", c) for c in contexts],
         "naive (full cache)": [decode_ms(naive, "auto", c) for c in contexts]}
fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(13, 3.5))
for name in work:
    ax0.plot(contexts, [m / 1e6 for m in work[name]], marker="o", label=name)
    ax1.plot(contexts, times[name], marker="o", label=name)
ax0.set(xlabel="tokens in the cache", ylabel="M multiply-adds per step and layer", title="attention work (counted)",
        yscale="log")
ax0.legend(fontsize=8)
ax1.set(xlabel="tokens in the cache", ylabel="ms per decoded token (whole model)",
        title="decode time (illustrative: one run, this machine)")
cache_mib = {name: [kv_cache_bytes(bench_cfg, c, torch.float32)[kind] / 2**20 for c in contexts]
             for name, kind in [("latent (absorbed, re-expanded)", "absorb"), ("naive (full K/V)", "naive")]}
for name, mib in cache_mib.items():
    ax2.plot(contexts, mib, marker="o", label=name)
ax2.set(xlabel="tokens in the cache", ylabel="MiB (float32)", title="cache size")
ax2.legend(fontsize=8)
fig.tight_layout()
plt.show()
for name, madds in work.items():
    print(f"{name:18s}", "  ".join(f"{m / 1e6:7.2f}" for m in madds), "M multiply-adds per step and layer")
per_cached_token = {"absorbed": h * (2 * r + dr), "re-expanded": h * (r * (dn + dv) + dn + dr + dv),
                    "naive (full cache)": h * (dn + dr + dv)}
print("each more cached token adds", per_cached_token, "multiply-adds per step and layer: re-expanding costs "
      f"{per_cached_token['re-expanded'] / per_cached_token['absorbed']:.0f}x the absorbed order, the absorbed order "
      f"{per_cached_token['absorbed'] / per_cached_token['naive (full cache)']:.1f}x the naive cache")
memory_ratio = kv_cache_bytes(bench_cfg, 1)["naive"] / kv_cache_bytes(bench_cfg, 1)["absorb"]
v3_ratio = mla_bytes["naive"] / mla_bytes["absorb"]
print(f"naive cache / latent cache: {memory_ratio:.1f}x here, {v3_ratio:.1f}x for DeepSeek-V3")

# %% [markdown]
# The left panel is counted, so it is the same on every machine: in multiply-adds per decode step and
# layer (one query, $s$ cached tokens, $h$ heads, latent rank $r$), the absorbed order costs
# $h (r (d_n + d_v) + s (2r + d_r))$, re-expanding the latent $h (s r (d_n + d_v) + s (d_n + d_r + d_v))$,
# and the naive cache $h (r (d_n + d_v) + s (d_n + d_r + d_v))$. All three grow linearly with the
# context; what differs is the constant per cached token: re-expanding pays a whole projection of
# every cached latent at every step (the ratio is printed above), the absorbed order pays $2r + d_r$
# per head, somewhat more than the naive path's $d_n + d_r + d_v$, and in exchange keeps a cache many
# times smaller (right panel, and the ratio printed above).
#
# The middle panel is the clock of one run on the machine that ran this notebook (the committed
# figure: 2 CPU cores), the whole model's decode step, the fastest of four. It is illustrative only:
# on a busy machine it is noisy, and at these small sizes fixed per-step costs (the other layers, the
# head, Python) hide much of the attention's growth. The checks assert the counts, never the clock.

# %% [markdown]
# ## Checks

# %%
check_cfg = ModelConfig.preset("tiny")
torch.manual_seed(1)
ref = DeepseekV3(check_cfg).eval()
fast = DeepseekV3(check_cfg, attn_impl="absorb", attn_order="absorbed").eval()  # absorbed maths for prefill too
fast.load_state_dict(ref.state_dict())
ids = torch.randint(0, check_cfg.vocab_size, (2, 20))
worst = 0.0
with torch.no_grad():
    full = ref(ids)
    cache_ref, cache_fast = ref.new_cache(2, 20), fast.new_cache(2, 20)
    a, b = ref(ids[:, :12], cache_ref, 0), fast(ids[:, :12], cache_fast, 0)
    worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    for pos in range(12, 20):
        a, b = ref(ids[:, pos:pos + 1], cache_ref, pos), fast(ids[:, pos:pos + 1], cache_fast, pos)
        worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
        worst = max(worst, ((b[:, 0] - full[:, pos]).abs().max() / full[:, pos].abs().max()).item())
print(f"worst relative difference, absorbed vs naive vs full recompute: {worst:.1e}")

assert score_gap < 1e-12 and value_gap < 1e-12                # the absorption identity, float64
assert worst < 1e-5                                           # absorbed == naive == recompute, float32
assert mla_bytes["absorb"] == 61 * 576 * 2                       # 70,272 bytes: about 70 KB per token
assert per_layer["MLA"] / d_h == 4.5                          # the V2 report's "4.5 d_h"
assert per_cached_token["re-expanded"] > 20 * per_cached_token["absorbed"]  # why re-expanding grows faster
assert all(e > 20 * a for e, a in zip(work["re-expanded"], work["absorbed"], strict=True))
print("all checks passed")

# %% [markdown]
# **Exercise:** [e02_absorbed_attention.ipynb](exercises/e02_absorbed_attention.ipynb): write one decode step of absorbed attention against the latent cache yourself; `dsv3ref`
# checks it and says where it first differs.
#
# **Next:** [03_routing.ipynb](03_routing.ipynb), DeepSeekMoE routing: sigmoid scores, group-limited
# choice, the balancing bias, grouped experts.
