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
# # 04 · Use dsv3ref as your oracle
#
# *Lesson 4 of the dsv3ref course (lessons 00 to 11), after [03_routing](03_routing.ipynb)
# (DeepSeekMoE routing).*
#
# **What this notebook teaches.** How to check your own DeepSeek-V3 implementation (a kernel, a
# serving engine, a port) against dsv3ref, and how to find *where* it goes wrong rather than only
# *that* its logits differ. We trace every intermediate tensor of a forward pass, line two traces up
# point by point, and let `compare` name the first point past tolerance. Then we plant three bugs that
# an implementer easily makes (each follows a real difference between DeepSeek's code and a common
# convention: GPT-NeoX's half-split RoPE, a bias used beyond the choice, YaRN's softmax scale) and
# watch `compare` point at the exact layer and tensor.
#
# Covers the whole forward pass of the report's §2.1; no new equations.

# %%
import tempfile
from functools import partial

import torch

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig, compare, trace

_ = torch.manual_seed(0)
_ = torch.set_grad_enabled(False)
cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=4)
model = DeepseekV3(cfg)
for name, p in model.named_parameters():            # weights large enough for the bugs to matter
    if "norm" not in name:
        p.normal_(0, 1.0 if "embed" in name else p.shape[-1] ** -0.5)
for name, b in model.named_buffers():               # a trained router's balancing bias is not zero
    if name.endswith("e_score_correction_bias"):
        b.normal_(0, 0.1)
folder = tempfile.mkdtemp()
dsv3ref.save_pretrained(model, folder)
ids = torch.randint(0, cfg.vocab_size, (2, 40))

# %% [markdown]
# ## 1. A trace
#
# `dsv3ref.trace(model, input_ids)` records, under the checkpoint's module names, the residual stream
# before and after attention, the attention output, the router's choice, the routed and shared
# experts' outputs, each layer's output, the final norm and the logits. Hooks are attached for the
# call and removed after it, so a model that is not being traced pays nothing.

# %%
reference = trace(DeepseekV3.from_pretrained(folder), ids)
for key, value in list(reference.items())[:12]:
    print(f"{key:48s} {tuple(value.shape)}")
print(f"... {len(reference)} points in all")

# %% [markdown]
# ## 2. Another implementation, same weights
#
# Here the other implementation is Hugging Face transformers' `DeepseekV3ForCausalLM`, traced with
# forward hooks on its modules (which carry the same names). To plug in your own model, give its
# modules the checkpoint's names (or wrap them) and call `dsv3ref.trace_modules(your_model, run)`,
# where `run` performs one forward pass: any implementation that can be hooked can be compared.
# `compare` prints one row per point: rounding differences (~1e-7 relative in float32) everywhere.
# (HF's `DeepseekV3ForCausalLM` has no Multi-Token Prediction module, so its load report lists the
# checkpoint's MTP weights as unexpected; that is expected here, and the report is silenced.)

# %%
import transformers
from transformers import DeepseekV3ForCausalLM

transformers.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()  # the expected report about the MTP weights
hf = DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
against_hf = compare(reference, dsv3ref.trace_hf(hf, ids))
print(against_hf)

# %% [markdown]
# ## 3. Three real bugs
#
# Each is injected into a fresh copy of the model; the trace of the broken copy is compared with the
# reference trace.
#
# 1. **RoPE in the wrong layout.** DeepSeek rotates interleaved pairs $(x_{2i}, x_{2i+1})$; the
#    Llama-style "rotate half" pairs $(x_i, x_{i+d/2})$. Loading DeepSeek weights into rotate-half
#    code without permuting them silently gives a different model.
# 2. **The balancing bias in the combine weights.** $b_i$ must only steer the choice of experts;
#    adding it to the gate values too changes every MoE output.
# 3. **YaRN without the mscale correction of the softmax scale.** With `factor` > 1 the attention
#    logits must be scaled by $(0.1 \ln s + 1)^2$ as well.

# %%
from dsv3ref import planted_bugs

bugs = {"non_interleaved_rope": planted_bugs.non_interleaved_rope,
        "bias_in_combine_weights": partial(planted_bugs.bias_in_combine_weights, layer=2),
        "yarn_without_mscale": planted_bugs.yarn_without_mscale}
found = {}
broken = DeepseekV3.from_pretrained(folder)
for name, bug in bugs.items():
    with bug(broken):                               # each bug is undone when its block ends
        result = compare(reference, trace(broken, ids))
    found[name] = result.first_divergence
    print(f"{name:26s} -> first divergence: {result.first_divergence}")

# %% [markdown]
# The table for the second bug: everything up to layer 2's router agrees to rounding; the router's
# gate values are the first point past tolerance (`>>`), its choice of experts (`:ids`) is unchanged,
# and everything downstream differs because of it.

# %%
with planted_bugs.bias_in_combine_weights(broken, layer=2):
    table = compare(reference, trace(broken, ids))
print("\n".join(str(table).splitlines()[16:30]))

# %% [markdown]
# ## 4. float64 as the oracle's own reference
#
# Loading with `dtype=torch.float64` runs every component in double precision, so the oracle's own
# rounding error sits far below what a float32 or bf16 implementation is tested against.

# %%
t64 = trace(DeepseekV3.from_pretrained(folder, dtype=torch.float64), ids)
float32_vs_64 = compare(t64, reference, rtol=1e-5)
worst = max(r.max_rel for r in float32_vs_64.rows if not r.key.endswith(":ids"))
print(f"float32 against float64: worst relative error {worst:.1e} over {len(float32_vs_64.rows)} points")

# %% [markdown]
# ## Checks

# %%
assert against_hf.ok                                                     # HF agrees at every point
assert found["non_interleaved_rope"] == "model.layers.0.self_attn"       # RoPE: the first attention
assert found["bias_in_combine_weights"] == "model.layers.2.mlp.gate:weights"  # the router of layer 2
assert found["yarn_without_mscale"] == "model.layers.0.self_attn"        # the softmax scale: first attention
assert table.routing_flips["model.layers.2.mlp.gate"] == 0               # the choice itself was right
assert float32_vs_64.ok and worst < 1e-5
print("all checks passed")

# %% [markdown]
# **Exercise:** [e04_bug_hunt.ipynb](exercises/e04_bug_hunt.ipynb): write a function that names a planted bug and its layer from a trace yourself; `dsv3ref`
# checks it and says where it first differs.
#
# **Next:** [05_mtp.ipynb](05_mtp.ipynb), Multi-Token Prediction: the MTP module, its objective, self-
# speculative decoding.
