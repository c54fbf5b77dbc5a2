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
# # Exercise 05 · The MTP module's combine step
#
# *Exercise for lesson [05_mtp](../05_mtp.ipynb) of the dsv3ref course; one of five (the list is in
# [the course's README](../README.md#exercises)).*
#
# **What you write.** The first thing a Multi-Token Prediction module does (report §2.2, eq. 21): for
# each position i it joins what the previous depth knew there, the hidden state h_i, with the
# embedding of the token one step ahead, t_{i+1}, and projects the pair back to the model's width:
#
#     h'_i = eh_proj [ RMSNorm_e(Emb(t_{i+1})) ; RMSNorm_h(h_i) ],   i = 0 .. T - 2
#
# with RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight (enorm's weight for the embedding, hnorm's for
# the hidden state). The order inside the brackets is the one the released `eh_proj` weight expects:
# embedding first. The last position has no next token, so the result has T - 1 rows.
#
# Arguments: `hidden` (T, d), `tokens` (T,) ids, `embedding` (V, d) (the embedding table the module
# shares with the main model), `enorm_weight` and `hnorm_weight` (d,), `eh_proj` (d, 2d) (a Linear's
# weight: y = x @ eh_proj.T), `eps`. Return (T - 1, d).
#
# **How it is checked.** `dsv3ref.exercises.check_mtp_combine` runs your function on float64 inputs,
# among them a hidden state of zeros, a single position (nothing to predict: zero rows) and small values
# where eps matters, and names the usual slips (the halves in the report's order, the embedding of t_i
# instead of t_{i+1}, the two norms exchanged, eps left out). The solution is in `solutions.py`
# beside this notebook.

# %%
import torch

from dsv3ref import exercises

_ = torch.manual_seed(0)  # for your own experiments (the checker seeds its cases itself)

# %%
def mtp_combine(hidden, tokens, embedding, enorm_weight, hnorm_weight, eh_proj, eps):
    """hidden (T, d), tokens (T,), embedding (V, d), enorm_weight (d,), hnorm_weight (d,), eh_proj (d, 2d),
    eps float -> (T - 1, d)."""
    # your answer here
    raise NotImplementedError


# %% [markdown]
# ## Check
#
# Run this cell after each try. While it says where your answer differs, `verdict.inputs` holds that
# case's inputs, so you can call your function on them and look inside.

# %%
verdict = exercises.check_mtp_combine(mtp_combine)
print(verdict)

# %% [markdown]
# **Back to the course:** [06_fp8.ipynb](../06_fp8.ipynb), the next lesson.
