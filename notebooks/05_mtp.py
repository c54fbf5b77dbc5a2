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
# # 05 · Multi-Token Prediction, and decoding with it
#
# *Lesson 5 of the dsv3ref course (lessons 00 to 11), after [04_oracle](04_oracle.ipynb) (dsv3ref as
# your oracle).*
#
# **What this notebook teaches.** DeepSeek-V3 is trained to predict not only the next token but the
# one after it, with a small extra module (MTP) that the published checkpoint keeps as
# `model.layers.61`. We draw its data flow, check the order in which the weights expect its two
# inputs, compute the training objective on a tiny model, train that model for a few seconds on a
# toy language, and then use the MTP module to *draft* tokens that the main model verifies in one
# pass: self-speculative decoding, with its acceptance rate and tokens per forward pass.
#
# What sets DeepSeek's MTP apart from parallel prediction heads (Gloeckle et al., 2024, which predict
# each future token independently from the same hidden state): its modules run *in sequence*, module
# k taking module k-1's output and the embedding of token i+k, so each depth keeps the complete causal
# chain of the tokens before the one it predicts (section 2.2).
#
# Report sections: DeepSeek-V3 §2.2 (eqs. 21-25), §5.4.3 (speculative decoding with MTP).

# %%
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from dsv3ref import DeepseekV3, ModelConfig, generate

_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. The data flow
#
# For position $i$ and depth $k$ (here $D = 1$, so $k = 1$): the main model's hidden state $h_i^0$
# (after its final norm) and the embedding of the *next* token $t_{i+1}$ are normalized,
# concatenated and projected back to the model width, pass through one more decoder layer, and the
# shared output head predicts $t_{i+2}$.

# %%
fig, ax = plt.subplots(figsize=(10, 3.6))
ax.set_xlim(0, 10)
ax.set_ylim(0, 4.6)
ax.axis("off")
boxes = {
    "main": (0.2, 2.6, "main model\n(61 layers, final norm)", "C0"),
    "emb": (0.2, 0.4, "Emb($t_{i+1}$)\n(shared embedding)", "C2"),
    "hnorm": (2.2, 2.6, "hnorm", "C7"),
    "enorm": (2.2, 0.4, "enorm", "C7"),
    "cat": (4.4, 1.5, "[enorm ; hnorm]\neh_proj (d x 2d)", "C1"),
    "block": (6.3, 1.5, "decoder layer\n(MLA + MoE)", "C1"),
    "head": (8.2, 1.5, "shared_head.norm\n-> head: $t_{i+2}$", "C3"),
    "out": (8.2, 3.6, "head: $t_{i+1}$", "C3"),
}
for x, y, text, color in boxes.values():
    ax.add_patch(FancyBboxPatch((x, y), 1.6, 0.8, boxstyle="round,pad=0.05", fc=color, alpha=0.25, ec=color))
    ax.text(x + 0.8, y + 0.4, text, ha="center", va="center", fontsize=8)
for a, b in [("main", "hnorm"), ("emb", "enorm"), ("hnorm", "cat"), ("enorm", "cat"), ("cat", "block"),
             ("block", "head")]:
    (xa, ya, *_), (xb, yb, *_) = boxes[a], boxes[b]
    ax.add_patch(FancyArrowPatch((xa + 1.65, ya + 0.4), (xb - 0.05, yb + 0.4), arrowstyle="->", mutation_scale=10))
# the main model's own head: from the top of its box, above hnorm, to the output on the right
ax.add_patch(FancyArrowPatch((1.0, 3.45), (8.15, 4.0), connectionstyle="angle,angleA=90,angleB=180,rad=0",
                             arrowstyle="->", mutation_scale=10))
ax.text(1.82, 3.1, "$h_i^0$", fontsize=9)
ax.set_title("one MTP module (depth 1): embedding first in the concatenation, as the weights expect")
fig.tight_layout()

# %% [markdown]
# ## 2. Which input comes first
#
# Eq. 21 of the report writes $[\mathrm{RMSNorm}(h_i^{k-1}); \mathrm{RMSNorm}(\mathrm{Emb}(t_{i+k}))]$, hidden state
# first. The published `eh_proj` weight (7168 x 14336) was trained on the opposite order: embedding
# first, as the serving engines that run these weights feed it. The two orders are different
# functions, so getting it wrong silently ruins the drafts. dsv3ref follows the weights:

# %%
cfg = ModelConfig.preset("tiny").replace(vocab_size=64)
model = DeepseekV3(cfg, attn_impl="absorb", moe_impl="grouped")
mtp = model.mtp_layers[0]
print("eh_proj weight:", tuple(mtp.eh_proj.weight.shape), "= (hidden, 2 * hidden)")
h = torch.randn(1, 3, cfg.hidden_size)
e = torch.randn(1, 3, cfg.hidden_size)
with torch.no_grad():
    ours = mtp.combine(h, e)                                            # [enorm(e) ; hnorm(h)]
    manual = mtp.eh_proj(torch.cat([mtp.enorm(e), mtp.hnorm(h)], -1))
    swapped = mtp.eh_proj(torch.cat([mtp.hnorm(h), mtp.enorm(e)], -1))
order_ok = torch.equal(ours, manual)
order_gap = ((ours - swapped).abs().max() / ours.abs().max()).item()
print(f"combine == embedding-first: {order_ok}; hidden-first differs by {order_gap:.2f} (relative)")

# %% [markdown]
# ## 3. The training objective, and a few seconds of training
#
# `model.loss(input_ids)` returns the main next-token loss and $\mathcal{L}_{MTP} = \frac{\lambda}{D}\sum_k
# \mathcal{L}^k_{MTP}$ (eq. 25, $\lambda = 0.3$, the report's weight for the first 10T tokens; 0.1 for the
# remaining 4.8T, section 4.2; `TrainConfig(mtp_lambda_late=0.1)` does the same). The toy language: every sequence follows a fixed random
# permutation of the 64 tokens, $t_{i+1} = \pi(t_i)$, so the next token *and* the one after it are
# predictable.

# %%
perm = torch.randperm(cfg.vocab_size)


def toy_batch(b=16, t=32):
    x = torch.empty(b, t, dtype=torch.long)
    x[:, 0] = torch.randint(0, cfg.vocab_size, (b,))
    for i in range(1, t):
        x[:, i] = perm[x[:, i - 1]]
    return x


prompts = [toy_batch(1, 4)[0].tolist() for _ in range(4)]
before = generate(model, prompts, 24, eos_token_id=[], speculative=True)

opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
history = {"main": [], "mtp (per depth)": []}
for _ in range(120):
    out = model.loss(toy_batch())
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    history["main"].append(out["main"].item())
    history["mtp (per depth)"].append(out["mtp_per_depth"].mean().item())
model.eval()

fig, ax = plt.subplots(figsize=(6, 3))
for name, values in history.items():
    ax.plot(values, label=name)
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy")
ax.legend()
fig.tight_layout()
print(f"after training: main loss {history['main'][-1]:.3f}, MTP loss {history['mtp (per depth)'][-1]:.3f}")

# %% [markdown]
# ## 4. Self-speculative decoding
#
# Each step, the MTP module drafts token $p+1$; the main model runs once over [token $p$, draft] and
# keeps the draft if it agrees (greedy) or by the rejection rule (sampling), then adds one token of
# its own. With $D = 1$ a main-model pass yields up to 2 tokens. The report measures 85-90%
# acceptance for DeepSeek-V3's second token and 1.8x the decoding speed.

# %%
after = generate(model, prompts, 24, eos_token_id=[], speculative=True)
plain = generate(model, prompts, 24, eos_token_id=[])
for name, g in [("untrained, speculative", before), ("trained, speculative", after), ("trained, plain", plain)]:
    rate = g.stats.get("acceptance_rate")
    print(f"{name:24s} acceptance {'-' if rate is None else f'{rate:.2f}':>5s}   "
          f"tokens per main forward {g.stats['tokens_per_forward']:.2f}")
print("speculative tokens == plain greedy tokens:", after.tokens == plain.tokens)

# %% [markdown]
# ## Checks

# %%
assert order_ok and order_gap > 0.01                     # embedding first; the other order is another function
assert history["main"][-1] < 0.2 * history["main"][0]    # both objectives learn the toy language
assert history["mtp (per depth)"][-1] < 0.2 * history["mtp (per depth)"][0]
assert after.tokens == plain.tokens                      # greedy speculation never changes the output
assert after.stats["acceptance_rate"] > before.stats["acceptance_rate"] + 0.5
assert after.stats["tokens_per_forward"] > 1.5           # close to the 2 tokens per pass that D = 1 allows
print("all checks passed")

# %% [markdown]
# **Exercise:** [e05_mtp_combine.ipynb](exercises/e05_mtp_combine.ipynb): write the MTP module's combine step (eq. 21) yourself; `dsv3ref`
# checks it and says where it first differs.
#
# **Next:** [06_fp8.ipynb](06_fp8.ipynb), FP8: E4M3, tile and block scales, the FP8 GEMM, accumulation
# precision.
