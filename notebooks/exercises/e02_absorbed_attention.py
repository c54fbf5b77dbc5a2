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
# # Exercise 02 · Absorbed attention against the latent cache
#
# *Exercise for lesson [02_mla](../02_mla.ipynb) of the dsv3ref course; one of five (the list is in
# [the course's README](../README.md#exercises)).*
#
# **What you write.** One decode step of Multi-head Latent Attention computed the way DeepSeek serves
# it: against the cache of latents, never expanding a key or a value per head (report §2.1.1, eqs.
# 1-11; lesson 02's "absorption identity"). For each batch row b the new token's query is given, split
# into its compressed half `q_nope` (H, dn) and its rotary half `q_rope` (H, dr), already rotated; the
# cache holds, per position s, the latent `c_kv[b, s]` (r numbers) and the shared rotary key
# `k_rope[b, s]` (dr numbers). Row b's cache is valid at positions 0 .. lengths[b] - 1; the new
# token's own latent is already stored at lengths[b] - 1; positions from lengths[b] on hold stale
# values of some older sequence. `w_kv_b` is `kv_b_proj.weight` (H (dn + dv), r): its rows are
# head-major, each head's dn key rows (W_UK) followed by its dv value rows (W_UV).
#
# Return `out` (B, H, dv), where for every head h
#
#     score_s = softmax_scale * (q_nope_h . W_UK_h c_s + q_rope_h . k_rope_s),  s < lengths[b]
#     out_h   = W_UV_h  sum_s softmax(score)_s c_s
#
# The aim is to move W_UK onto the query (q_nope_h W_UK_h is a vector of r numbers) and W_UV after the
# sum, so the work per cached position is r + dr multiply-adds per head. The checker compares values
# only; count your own multiply-adds against lesson 02's.
#
# **How it is checked.** `dsv3ref.exercises.check_absorbed_attention` runs your function on float64
# inputs, among them rows of different lengths with stale values past their ends, a cache of one
# position, and DeepSeek-V3's head sizes (128 + 64 query, 128 value, a 512-wide latent), against
# attention with every key and value expanded; it says where your output first differs and, for the
# usual slips (the new token left out, the stale positions let in, the rotary half or the scale
# forgotten), which. The solution is in `solutions.py` beside this notebook: read it after yours passes.

# %%
import torch

from dsv3ref import exercises

_ = torch.manual_seed(0)  # for your own experiments (the checker seeds its cases itself)

# %%
def absorbed_attention(q_nope, q_rope, c_kv, k_rope, lengths, w_kv_b, softmax_scale):
    """q_nope (B, H, dn), q_rope (B, H, dr), c_kv (B, S, r), k_rope (B, S, dr), lengths (B,) int,
    w_kv_b (H * (dn + dv), r), softmax_scale float -> out (B, H, dv)."""
    # your answer here
    raise NotImplementedError


# %% [markdown]
# ## Check
#
# Run this cell after each try. While it says where your answer differs, `verdict.inputs` holds that
# case's inputs, so you can call your function on them and look inside.

# %%
verdict = exercises.check_absorbed_attention(absorbed_attention)
print(verdict)

# %% [markdown]
# **Back to the course:** [03_routing.ipynb](../03_routing.ipynb), the next lesson.
