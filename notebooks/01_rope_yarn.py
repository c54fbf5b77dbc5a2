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
# # 01 · Rotary positions and YaRN: how DeepSeek-V3 reads 128K tokens
#
# *Lesson 1 of the dsv3ref course (lessons 00 to 11), after [00_overview](00_overview.ipynb)
# (DeepSeek-V3 at a glance).*
#
# **What this notebook teaches.** How rotary position embeddings (RoPE) put a token's position into
# its query and key as rotations, why DeepSeek's checkpoints rotate *interleaved* pairs of dimensions
# and why an implementation that de-interleaves them (Hugging Face's) gives the same attention
# scores, and how YaRN stretches a model pre-trained on 4K tokens to 128K: which frequencies it
# slows down (the ramp between `beta_fast` = 32 and `beta_slow` = 1) and why its `mscale` enters the
# softmax scale squared.
#
# Report sections: DeepSeek-V3 §2.1.1 (eq. 3 and 8: RoPE on the decoupled key and query), §4.3
# (long context extension with YaRN: s = 40, alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1). MLA
# (the next lesson) applies RoPE to 64 of each head's 192 query/key dimensions only.

# %%
import math
import tempfile

import matplotlib.pyplot as plt
import torch
from transformers.modeling_rope_utils import _compute_yarn_parameters
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3Config,
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb_interleave,
)

from dsv3ref import ModelConfig
from dsv3ref.rope import RotaryEmbedding, apply_rope, rope_inv_freq, softmax_scale, yarn_mscale

_ = torch.manual_seed(0)
v3 = ModelConfig.preset("deepseek-v3")
plain = v3.replace(rope_scaling=None)  # the same model without YaRN: RoPE as pre-trained at 4K
print("qk_rope_head_dim:", v3.qk_rope_head_dim, " rope_theta:", v3.rope_theta)
print("YaRN:", v3.rope_scaling)

# %% [markdown]
# ## 1. A position is a rotation
#
# RoPE splits the rotary part of a query or key (64 numbers) into 32 pairs and turns pair $i$ of the
# token at position $m$ by the angle $m \theta_i$, with $\theta_i = \mathrm{rope\_theta}^{-2i/64}$. A
# score $q_m \cdot k_n$ then depends on the positions only through $m - n$: rotating both by the
# same extra angle changes nothing.

# %%
rotary = RotaryEmbedding(plain)
q = torch.randn(64, dtype=torch.float64)
k = torch.randn(64, dtype=torch.float64)


def score(m: int, n: int, rot=rotary) -> float:
    cos, sin = rot(torch.tensor([m, n]), torch.float64)  # (2, 32) each
    return (apply_rope(q, cos[0], sin[0]) @ apply_rope(k, cos[1], sin[1])).item()


pairs = [(10, 3), (1010, 1003), (100_007, 100_000)]
for m, n in pairs:
    print(f"score(q at {m:>7}, k at {n:>7}) = {score(m, n):+.12f}   (m - n = {m - n})")
relative_gap = max(abs(score(m, n) - score(*pairs[0])) for m, n in pairs)

# %% [markdown]
# ## 2. Interleaved pairs, and why de-interleaving gives the same scores
#
# DeepSeek's weights expect the pairs to be *interleaved*: $(x_0, x_1), (x_2, x_3), \dots$ Many
# implementations (GPT-NeoX, Llama) rotate *half-split* pairs $(x_i, x_{i+32})$ instead. Applying the
# half-split rotation to DeepSeek's weights is a real bug (lesson 04 finds it). Hugging Face's
# `apply_rotary_pos_emb_interleave` rotates DeepSeek's interleaved pairs but returns q and k
# *de-interleaved* (all first members, then all second members). That is a permutation of the
# coordinates, the same for q and for k, and a dot product does not care about the order of its
# terms: the scores are DeepSeek's.

# %%
t = 12
positions = torch.arange(t)
qs = torch.randn(1, 1, t, 64, dtype=torch.float64)  # (batch, heads, tokens, rope dims), HF's layout
ks = torch.randn(1, 1, t, 64, dtype=torch.float64)
cos, sin = rotary(positions, torch.float64)          # (t, 32): one angle per pair
ours_q, ours_k = apply_rope(qs, cos, sin), apply_rope(ks, cos, sin)
hf_cos, hf_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]  # HF's (1, t, 64) tables
hf_q, hf_k = apply_rotary_pos_emb_interleave(qs, ks, hf_cos, hf_sin)
layout_gap = (ours_q - hf_q).abs().max().item()
scores_gap = (ours_q @ ours_k.transpose(-1, -2) - hf_q @ hf_k.transpose(-1, -2)).abs().max().item()
deinterleave = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])
print(f"rotated q, ours vs HF, element by element: max difference {layout_gap:.2f} (different layouts)")
print(f"the same after de-interleaving ours: {(ours_q[..., deinterleave] - hf_q).abs().max().item():.1e}")
print(f"attention scores, ours vs HF: max difference {scores_gap:.1e}")

# %% [markdown]
# ## 3. YaRN's frequency ramp
#
# Pre-trained at $L = 4096$ positions, pair $i$ turns $L \theta_i / 2\pi$ times over the training
# context. YaRN (DeepSeek-V3 §4.3, with the release's `factor` s = 40) leaves the fast pairs alone
# (more than `beta_fast` = 32 turns: they have seen every angle many times), divides the slow ones by
# $s$ (fewer than `beta_slow` = 1 turn: at 160K positions they would reach angles never seen), and
# blends linearly in between. The slowest pairs then turn no further over 163,840 positions than they
# did over 4,096.

# %%
base = rope_inv_freq(plain)      # (32,) float64
yarn = rope_inv_freq(v3)
rs = v3.rope_scaling
turns = rs.original_max_position_embeddings * base / (2 * math.pi)
kept, divided = turns > rs.beta_fast, turns < rs.beta_slow
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
ax1.semilogy(turns, "o-", ms=3, label="turns over 4K, plain RoPE")
ax1.semilogy(v3.max_position_embeddings * yarn / (2 * math.pi), "s-", ms=3, label="turns over 160K, YaRN")
ax1.semilogy(v3.max_position_embeddings * base / (2 * math.pi), "x--", ms=3, label="turns over 160K, plain RoPE")
ax1.axhline(rs.beta_fast, color="k", lw=0.6, ls=":")
ax1.axhline(rs.beta_slow, color="k", lw=0.6, ls=":")
ax1.text(31, rs.beta_fast * 1.3, "beta_fast = 32", ha="right", fontsize=8)
ax1.text(31, rs.beta_slow * 1.3, "beta_slow = 1", ha="right", fontsize=8)
ax1.set_xlabel("rotary pair i")
ax1.set_ylabel("full turns")
ax1.legend(fontsize=7)
ax2.plot(yarn / base, "o-", ms=3)
ax2.set_yscale("log")
ax2.set_xlabel("rotary pair i")
ax2.set_ylabel("YaRN frequency / RoPE frequency")
ax2.set_title(f"kept: {int(kept.sum())} pairs, ramp: {int((~kept & ~divided).sum())}, divided by 40: "
              f"{int(divided.sum())}", fontsize=9)
fig.tight_layout()
slowest_turns = {"4K, plain": turns[-1].item(),
                 "160K, YaRN": (v3.max_position_embeddings * yarn[-1] / (2 * math.pi)).item()}
print("slowest pair's turns:", {k: round(v, 3) for k, v in slowest_turns.items()})

# %% [markdown]
# ## 4. mscale, squared into the softmax scale
#
# Stretching the context flattens attention (more keys share the probability mass), so YaRN sharpens
# it again with a temperature: queries and keys are each scaled by $\sqrt{t} = 0.1 \ln s + 1$. A
# score is the product of a query and a key, so it is scaled by that factor *squared*. DeepSeek-V3
# folds it into the softmax scale, for the whole 192-dimension score (`mscale_all_dim` = 1), and
# leaves the cos/sin tables at amplitude 1 (`mscale` / `mscale_all_dim` = 1):
#
# $$\text{softmax scale} = \frac{(0.1 \ln 40 + 1)^2}{\sqrt{192}} = \frac{1.8738\ldots}{13.856\ldots}.$$

# %%
m = yarn_mscale(rs.factor, rs.mscale_all_dim)
print(f"0.1 ln 40 + 1 = {m:.6f};  squared = {m ** 2:.6f}")
print(f"softmax scale: dsv3ref {softmax_scale(v3):.12f}  plain 1/sqrt(192) {v3.qk_head_dim ** -0.5:.12f}")
# HF's attention and rotary modules for the same config.json (built on the meta device: no weights)
folder = tempfile.mkdtemp()
v3.save(folder)
hf_cfg = DeepseekV3Config.from_pretrained(folder)
with torch.device("meta"):
    hf_attention = DeepseekV3Attention(hf_cfg, layer_idx=0)
hf_freq, hf_amplitude = _compute_yarn_parameters(hf_cfg)
hf_rotary = DeepseekV3RotaryEmbedding(hf_cfg)
print(f"softmax scale: HF {hf_attention.scaling:.12f}; cos/sin amplitude: HF {hf_amplitude}")

# %% [markdown]
# The tables themselves: dsv3ref forms each angle $m \theta_i$ in float64 and rounds cos and sin once;
# HF forms the angle in float32, whose rounding grows with the position (an angle of $10^5$ radians
# carries about $10^5 \cdot 2^{-24}$ of it). Both agree over the pre-training context; far out, only
# the float64 angles stay exact.

# %%
positions = torch.tensor([[0, 100, 4095, 32_767, 131_071, 163_839]])
ours_cos, _ = RotaryEmbedding(v3)(positions, torch.float32)
exact_cos = (positions[0, :, None].double() * yarn).cos()      # float64 closed form
hf_cos, _ = hf_rotary(torch.zeros(1), positions)
hf_cos = hf_cos[0, :, :32]                                      # HF's table repeats the 32 angles
ours_err = (ours_cos[0].double() - exact_cos).abs().amax(-1)
hf_err = (hf_cos.double() - exact_cos).abs().amax(-1)
for p, a, b in zip(positions[0].tolist(), ours_err.tolist(), hf_err.tolist(), strict=True):
    print(f"position {p:>7}: |cos - exact|  dsv3ref {a:.1e}   HF {b:.1e}")

# %% [markdown]
# ## 5. From 4K to 128K
#
# The release was pre-trained with 4K positions, extended with YaRN to 32K and then 128K (§4.3), and
# its config allows 163,840 = 40 x 4,096 positions. The ramp keeps every pair inside the angles it
# was trained on, and the squared mscale keeps the attention from flattening; lesson 02 uses these
# cos/sin tables for the 64 rotary dimensions of each query and of the one shared rotary key.

# %% [markdown]
# ## Checks

# %%
assert relative_gap < 1e-9           # a score depends only on m - n (angles of 1e5 rad carry ~1e-11 of rounding)
assert layout_gap > 0.1 and scores_gap < 1e-12                # HF's layout differs, its scores do not
assert torch.allclose(ours_q[..., deinterleave], hf_q, rtol=0, atol=1e-14)
assert torch.allclose(yarn[kept], base[kept], rtol=1e-14, atol=0)           # fast pairs kept
assert torch.allclose(yarn[divided], base[divided] / 40, rtol=1e-14, atol=0)  # slow pairs divided by s
assert kept.any() and divided.any() and (~kept & ~divided).any()             # and a ramp between them
assert ((yarn - hf_freq.double()).abs() / yarn).max() < 1e-6   # HF's YaRN frequencies (float32)
assert slowest_turns["160K, YaRN"] <= slowest_turns["4K, plain"] * 1.0001   # no new angles at 160K
assert abs(m ** 2 - 1.8738) < 1e-4 and v3.max_position_embeddings == 40 * 4096
assert abs(softmax_scale(v3) - hf_attention.scaling) < 1e-15 and hf_amplitude == 1.0
assert ours_err.max() < 1e-7                                    # float64 angles, one float32 rounding
assert hf_err[:3].max() < 1e-3                                  # HF agrees over the pre-training context
print("all checks passed")

# %% [markdown]
# **Next:** [02_mla.ipynb](02_mla.ipynb), Multi-head Latent Attention: the latent, absorption, the
# cache, decode cost against context.
