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
# # Exercise 03 · Group-limited sigmoid top-k routing with the balancing bias
#
# *Exercise for lesson [03_routing](../03_routing.ipynb) of the dsv3ref course; one of five (the list is
# in [the course's README](../README.md#exercises)).*
#
# **What you write.** The DeepSeek-V3 router's choice for a batch of tokens (report §2.1.2, eqs.
# 13-16). You get the affinities `scores` (T, E), already s_{i,t} = sigmoid(u_t . e_i), and the
# auxiliary-loss-free balancing bias `bias` (E,). For every token:
#
# 1. choose by the *biased* score s_{i,t} + b_i (eq. 16);
# 2. split the E experts into `n_group` groups of consecutive ids; rank each group by the sum of its
#    two best biased scores, and keep only the `topk_group` best groups;
# 3. take the `top_k` experts with the highest biased scores from the kept groups;
# 4. weigh them with their *unbiased* scores, normalized to sum to one, times `scaling` (eq. 13 and
#    `routed_scaling_factor`): the bias chooses, it never weighs.
#
# Return `(ids, weights)`, both (T, top_k); the order of a token's experts is yours.
#
# **How it is checked.** `dsv3ref.exercises.check_routing` runs your function on DeepSeek-V3's shape
# (256 experts in 8 groups, 4 kept, top 8), on a zero bias and a large one, on scores with exact ties
# (where several choices are equally right: any of them passes), on one group, one token and no tokens.
# It says which token's choice or which weight first differs and, for the usual slips (the bias left
# out of the choice or put into the weights, the group limit ignored, groups ranked by their best
# expert, a softmax instead of the sum), which. The solution is in `solutions.py` beside this notebook.

# %%
import torch

from dsv3ref import exercises

_ = torch.manual_seed(0)  # for your own experiments (the checker seeds its cases itself)

# %%
def route(scores, bias, n_group, topk_group, top_k, scaling):
    """scores (T, E) float64 in (0, 1), bias (E,), ints n_group, topk_group, top_k, float scaling
    -> ids (T, top_k) int64, weights (T, top_k)."""
    # your answer here
    raise NotImplementedError


# %% [markdown]
# ## Check
#
# Run this cell after each try. While it says where your answer differs, `verdict.inputs` holds that
# case's inputs, so you can call your function on them and look inside.

# %%
verdict = exercises.check_routing(route)
print(verdict)

# %% [markdown]
# **Back to the course:** [04_oracle.ipynb](../04_oracle.ipynb), the next lesson.
