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
# # Exercise 06 · 128x128 weight blocks and 1x128 activation tiles in E4M3
#
# *Exercise for lesson [06_fp8](../06_fp8.ipynb) of the dsv3ref course; one of five (the list is in
# [the course's README](../README.md#exercises)).*
#
# **What you write.** DeepSeek-V3's fine-grained quantization (report §3.3.2): two functions.
#
# - `quantize_weight(w)`: w (out, in) float32 is cut into blocks of 128 x 128 elements; returns the
#   E4M3 weight `q` (out, in) and `scale` (ceil(out / 128), ceil(in / 128)) float32, one per block:
#   the release's `weight_scale_inv`, which dequantizing multiplies by.
# - `quantize_activation(x)`: x (..., K) float32 is cut along its last axis into tiles of 128 channels
#   (one row each); returns `q` (..., K) and `scale` (..., ceil(K / 128)).
#
# For every block or tile: amax = the largest |x| among its elements, floored at 1e-4; scale =
# amax / 448 (E4M3's largest value), in float32; q = x / scale, clamped to [-448, 448] and rounded
# to E4M3 (`.to(torch.float8_e4m3fn)`). A block or tile cut short by the tensor's end (a size that is
# not a multiple of 128) holds only the elements it has, and still gets its own scale.
#
# **How it is checked.** `dsv3ref.exercises.check_quantization` compares your scales and the bytes of
# your q *exactly* with the rule above, on whole blocks, blocks cut short at the bottom and the right,
# an all-zero block, one large entry, a batch of token rows and a single partial tile. It names the
# first scale or byte that differs, the elements it covers and, for the usual slips (448 / amax, no
# floor, one scale for the whole tensor, floor instead of ceil), which. The solution is in
# `solutions.py` beside this notebook.

# %%
import torch

from dsv3ref import exercises

_ = torch.manual_seed(0)  # for your own experiments (the checker seeds its cases itself)

# %%
def quantize_weight(w):
    """w (out, in) float32 -> q (out, in) float8_e4m3fn, scale (ceil(out/128), ceil(in/128)) float32."""
    # your answer here
    raise NotImplementedError


def quantize_activation(x):
    """x (..., K) float32 -> q (..., K) float8_e4m3fn, scale (..., ceil(K/128)) float32."""
    # your answer here
    raise NotImplementedError


# %% [markdown]
# ## Check
#
# Run this cell after each try. While it says where your answer differs, `verdict.inputs` holds that
# case's input, so you can call your functions on it and look inside.

# %%
verdict = exercises.check_quantization(quantize_weight, quantize_activation)
print(verdict)

# %% [markdown]
# **Back to the course:** [07_text.ipynb](../07_text.ipynb), the next lesson.
