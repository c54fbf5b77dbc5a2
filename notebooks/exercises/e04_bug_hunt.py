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
# # Exercise 04 · The planted-bug hunt
#
# *Exercise for lesson [04_oracle](../04_oracle.ipynb) of the dsv3ref course; one of five (the list is
# in [the course's README](../README.md#exercises)).*
#
# **What you write.** A function that diagnoses a broken model the way lesson 04 does by hand. The
# checker builds a small float64 DeepSeek-V3 (`exercises.mystery_model`), plants one of the bugs of
# `exercises.bugs()` in it, or none, and hands you the clean model as `reference`, the trace of the
# broken one as `suspect` (`dsv3ref.trace` on `input_ids`) and the input. Return which bug it is and
# where: `(name, layer)`, with the MoE layer's index for the bugs planted in one layer
# (`exercises.LAYERED`) and None for those planted in every attention layer, or `None` when nothing
# is broken.
#
# `dsv3ref.compare(dsv3ref.trace(reference, input_ids), suspect)` tells you where the suspect first
# diverges, which narrows the candidates; to be sure, reproduce each candidate:
# `with exercises.plant(reference, (name, layer)):` runs the reference with that bug, and the right
# candidate's trace equals the suspect's exactly.
#
# **How it is checked.** `dsv3ref.exercises.check_bug_hunt` hands your function six mysteries, one of
# them clean; an answer whose bug computes exactly what the planted one computes is also right. For
# a wrong answer it says what was planted, where `compare` first sees it, and where your answer would
# show. The solution is in `solutions.py` beside this notebook.

# %%
import torch

import dsv3ref  # noqa: F401 (your diagnose will want dsv3ref.trace and dsv3ref.compare)
from dsv3ref import exercises

_ = torch.manual_seed(0)  # for your own experiments (the checker seeds its cases itself)
print("bugs a mystery may carry:", list(exercises.bugs()), "- planted in one MoE layer:", list(exercises.LAYERED))
model = exercises.mystery_model(seed=0)
print("its MoE layers:", [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)])

# %%
def diagnose(reference, suspect, input_ids):
    """reference: a DeepseekV3 (clean), suspect: the trace of the same model with a bug planted,
    input_ids (B, T) -> (bug name, layer or None), or None when the suspect is clean."""
    # your answer here
    raise NotImplementedError


# %% [markdown]
# ## Check
#
# Run this cell after each try. While it says where your answer differs, `verdict.inputs` holds that
# mystery's seed, input and (no peeking) the planted answer.

# %%
verdict = exercises.check_bug_hunt(diagnose)
print(verdict)

# %% [markdown]
# **Back to the course:** [05_mtp.ipynb](../05_mtp.ipynb), the next lesson.
