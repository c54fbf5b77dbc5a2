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
# # 00 · DeepSeek-V3 at a glance
#
# *Lesson 0 of the dsv3ref course (lessons 00 to 11), the first lesson: start here.*
#
# **What this notebook teaches.** The shape of the whole model before any one idea is opened up:
# the configuration of the released 671B model, what one decoder block computes, where the
# parameters live (and why only 37B of 671B are *activated* per token), and a tiny model built from
# the same code whose forward pass we check against an independent implementation
# (Hugging Face transformers' `DeepseekV3ForCausalLM`) on the same weights.
#
# Report sections: §2.1 (architecture: MLA §2.1.1, DeepSeekMoE §2.1.2), §4.2 (hyper-parameters).
#
# The course, one idea per lesson, in this order:
#
# 1. [01_rope_yarn.ipynb](01_rope_yarn.ipynb): Rotary positions and YaRN (interleaved RoPE, YaRN's frequency ramp and mscale, 4K to 128K context)
# 2. [02_mla.ipynb](02_mla.ipynb): Multi-head Latent Attention (the latent, absorption, the cache, decode cost against context)
# 3. [03_routing.ipynb](03_routing.ipynb): DeepSeekMoE routing (sigmoid scores, group-limited choice, the balancing bias, grouped experts)
# 4. [04_oracle.ipynb](04_oracle.ipynb): dsv3ref as your oracle (tracing, comparing with HF, finding bugs by their first divergence)
# 5. [05_mtp.ipynb](05_mtp.ipynb): Multi-Token Prediction (the MTP module, its objective, self-speculative decoding)
# 6. [06_fp8.ipynb](06_fp8.ipynb): FP8 (E4M3, tile and block scales, the FP8 GEMM, accumulation precision)
# 7. [07_text.ipynb](07_text.ipynb): Text in, text out (the tokenizer, the chat template, a streamed reply)
# 8. [08_scale_out.ipynb](08_scale_out.ipynb): From one process to sixteen GPUs (tensor and expert parallelism in float64 and FP8, all-reduce vs all-to-all, the memory planner, the report's prefill and decode units, torchrun)
# 9. [09_training.ipynb](09_training.ipynb): Training (a small model in a minute with the report's schedules; the bias update, MTP and FP8 measured over three seeds)
# 10. [10_kernels.ipynb](10_kernels.ipynb): The kernels behind the model (the paged latent cache, grouped GEMM layouts, dispatch and combine, a model run through a planted-bug kernel)
# 11. [11_training_across_gpus.ipynb](11_training_across_gpus.ipynb): Training across GPUs (the report's PP16 x EP64 x ZeRO-1 layout per GPU, pipeline schedules and their bubbles against Table 2, DualPipe's overlap, the layout run on 2 and 4 processes equal to one)

# %%
import tempfile

import matplotlib.pyplot as plt
import torch

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig, count_parameters

_ = torch.manual_seed(0)

# %% [markdown]
# ## The configuration
#
# `ModelConfig.preset("deepseek-v3")` is the published `config.json`, field for field. The fields that
# shape the computation:

# %%
cfg = ModelConfig.preset("deepseek-v3")
fields = ["hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
          "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
          "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
          "first_k_dense_replace", "routed_scaling_factor", "scoring_func", "topk_method", "vocab_size",
          "max_position_embeddings", "num_nextn_predict_layers"]
for name in fields:
    print(f"{name:28s} {getattr(cfg, name)}")
print(f"{'rope_scaling':28s} {cfg.rope_scaling}")

# %% [markdown]
# ## One decoder block
#
# Every layer is pre-norm: `h = x + MLA(RMSNorm(x))`, then `out = h + FFN(RMSNorm(h))`.
# With DeepSeek-V3's sizes (d = 7168, 128 heads, per token):
#
# | step | tensor | shape | checkpoint name |
# |---|---|---|---|
# | query latent | $c^Q = \mathrm{RMSNorm}(W^{DQ} h)$ | 1536 | `q_a_proj`, `q_a_layernorm` |
# | queries | $[q^C; q^R] = W^{UQ} c^Q$, RoPE on $q^R$ | 128 × (128 + 64) | `q_b_proj` |
# | KV latent (cached) | $c^{KV} = \mathrm{RMSNorm}(W^{DKV} h)$ | 512 | `kv_a_proj_with_mqa`[:512], `kv_a_layernorm` |
# | shared rotary key (cached) | $k^R = \mathrm{RoPE}(W^{KR} h)$ | 64 | `kv_a_proj_with_mqa`[512:] |
# | per-head keys, values | $k^C = W^{UK} c^{KV}$, $v = W^{UV} c^{KV}$ | 128 × 128, 128 × 128 | `kv_b_proj` |
# | attention output | softmax$(q \cdot [k^C; k^R] / \sqrt{192} \cdot m^2)\, v$ | 128 × 128 → 7168 | `o_proj` |
# | FFN, layers 0-2 | SwiGLU, width 18432 | 7168 | `mlp.{gate,up,down}_proj` |
# | FFN, layers 3-60 | 1 shared + 8 of 256 routed experts, width 2048 | 7168 | `mlp.shared_experts`, `mlp.experts.{e}`, `mlp.gate` |
#
# The tiny preset has the same structure; here is its second block (an MoE layer):

# %%
tiny_cfg = ModelConfig.preset("tiny")
tiny = DeepseekV3(tiny_cfg).eval()
print(tiny.model.layers[1])

# %% [markdown]
# ## Where the parameters are
#
# `count_parameters` builds the modules on PyTorch's *meta* device: shapes without memory, so the
# 671B model is counted in a fraction of a second on a laptop.

# %%
count = count_parameters(cfg)
d = cfg.hidden_size
expert = count.routed_expert
n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
routed = n_moe * cfg.n_routed_experts * expert
shared = n_moe * cfg.n_shared_experts * expert
dense_ffn = (cfg.num_hidden_layers - n_moe) * 3 * d * cfg.intermediate_size
everything_else = count.total - routed - shared - dense_ffn - count.embedding - count.head
parts = {"routed experts": routed, "shared experts": shared, "dense FFN (3 layers)": dense_ffn,
         "attention, norms, routers": everything_else, "embedding": count.embedding, "LM head": count.head}
for name, n in parts.items():
    print(f"{name:28s} {n / 1e9:8.2f}B")
print(f"{'total':28s} {count.total / 1e9:8.2f}B   ({count.total:,})")
print(f"{'activated per token':28s} {count.activated / 1e9:8.2f}B")
print(f"{'MTP module (not in total)':28s} {count.mtp / 1e9:8.2f}B")
# the release stores layer 61 with its own copies of the embedding and the head: the model card's "14B"
print(f"{'MTP module as stored':28s} {(count.mtp + count.embedding + count.head) / 1e9:8.2f}B   "
      f"(with its embedding and head copies; 671B + this = the card's 685B)")
print(f"routed experts: {routed / count.total:.1%} of the total")

active = {"routed experts": n_moe * cfg.num_experts_per_tok * expert}
fig, ax = plt.subplots(figsize=(8, 2.6))
left_total = left_active = 0
for i, (name, n) in enumerate(parts.items()):
    ax.barh(1, n / 1e9, left=left_total, color=f"C{i}", label=name)
    m = active.get(name, n)
    ax.barh(0, m / 1e9, left=left_active, color=f"C{i}")
    left_total += n / 1e9
    left_active += m / 1e9
ax.set_yticks([0, 1], ["activated per token", "stored"])
ax.set_xlabel("parameters (billions)")
ax.legend(loc="lower right", fontsize=7, ncol=2)
ax.set_title("DeepSeek-V3: 671B stored, about 37B used per token")
fig.tight_layout()

# %% [markdown]
# The routed experts hold almost all the weights (the share is printed below), but each token
# visits only 8 of the 256 in each MoE layer; that is what makes 671B parameters cost like a 37B
# model per token.

# %% [markdown]
# ## A tiny model, checked against an independent implementation
#
# We give the tiny model random weights, save it in the published checkpoint format, load the same
# files into Hugging Face transformers' `DeepseekV3ForCausalLM` (installed with the test extra,
# `pip install -e ".[test]"`), and compare the logits of one batch. HF's class has no Multi-Token
# Prediction module, so its load report lists the checkpoint's MTP weights (`model.layers.3.*`) as
# unexpected: that is expected here, and we silence the report.

# %%
import transformers
from transformers import DeepseekV3ForCausalLM

transformers.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()  # the expected report about the MTP weights
with torch.no_grad():
    for name, p in tiny.named_parameters():  # weights large enough that attention and routing matter
        if "norm" not in name:
            p.normal_(0, 1.0 if "embed" in name else p.shape[-1] ** -0.5)
folder = tempfile.mkdtemp()
dsv3ref.save_pretrained(tiny, folder)
hf = DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()

ids = torch.randint(0, tiny_cfg.vocab_size, (2, 24))
with torch.no_grad():
    ours, theirs = tiny(ids), hf(ids).logits
relative_error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
print("logits", tuple(ours.shape), f"relative error vs HF: {relative_error:.2e}")

# %% [markdown]
# ## Checks

# %%
assert cfg.to_dict()["rope_scaling"]["factor"] == 40 and cfg.kv_lora_rank == 512
assert count.total == 671_026_404_352                # a direct count of the published config
assert round(count.total / 1e9) == 671               # "671B total parameters"
assert abs(count.activated / 1e9 - 37) < 1           # "37B activated for each token"
assert 0.974 < routed / count.total < 0.975         # 653.91B of 671.03B are routed experts
assert relative_error < 1e-5                         # same logits as HF transformers on the same weights
print("all checks passed")

# %% [markdown]
# **Next:** [01_rope_yarn.ipynb](01_rope_yarn.ipynb), Rotary positions and YaRN: interleaved RoPE,
# YaRN's frequency ramp and mscale, 4K to 128K context.
