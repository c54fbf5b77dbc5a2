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
# # 06 · FP8 the way DeepSeek-V3 does it
#
# *Lesson 6 of the dsv3ref course (lessons 00 to 11), after [05_mtp](05_mtp.ipynb) (Multi-Token Prediction).*
#
# **What this notebook teaches.** DeepSeek-V3 was trained, and is shipped, with its big matrix
# multiplications in 8-bit floating point (E4M3). Three ideas make that work, and each is computed
# exactly here on a CPU: fine-grained scales (one per 128 x 128 weight block, one per token per 128
# activation channels), because a single outlier ruins a per-tensor scale; dequantization and the
# block-scaled GEMM as the published checkpoint defines them; and promotion of partial sums to
# float32 every 128 elements, because tensor cores accumulate FP8 products with only ~14 bits.
#
# What the fine-grained scales make possible (section 3.3.2): E4M3 for *every* tensor, forward and
# backward, where earlier FP8 training used E4M3 in the forward pass and the wider-range E5M2 for
# gradients; and *online* scales, each tile's maximum taken from the tile itself at the moment it is
# quantized, instead of delayed scaling from the maxima of earlier iterations. The training side
# described but not run here (§3.3, low-precision storage and communication): activations cached for
# the backward pass in FP8,
# the MoE dispatch sent in FP8 (the combine stays BF16), and AdamW's moments kept in BF16. Section 4
# below promotes every N_C = 128 elements: on an H800 that is four WGMMA instructions.
#
# Report sections: DeepSeek-V3 §3.3 (FP8 training: fine-grained quantization, increasing
# accumulation precision), and the release's `weight_block_size: [128, 128]`.

# %%
import tempfile

import matplotlib.pyplot as plt
import torch

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig
from dsv3ref.convert import convert
from dsv3ref.fp8 import (
    E4M3,
    dequantize_weight,
    fp8_matmul,
    fp8_matmul_dequantized,
    fp8_matmul_scaled_mm,
    limited_precision_dot,
    quantize_activation,
    quantize_weight,
    scaled_mm_recipe,
)

_ = torch.manual_seed(0)
_ = torch.set_grad_enabled(False)

# %% [markdown]
# ## 1. The E4M3 grid
#
# All 256 bit patterns: 1 sign bit, 4 exponent bits, 3 mantissa bits, no infinities (only the all-ones
# patterns are NaN). Between powers of two there are 8 values, so rounding moves a value by at most
# 1/16 of itself.

# %%
grid = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
positive = grid[(grid > 0) & grid.isfinite()].unique()
print(f"{len(positive)} positive values, from {positive.min().item():.6f} (2^-9, subnormal) "
      f"to {positive.max().item():.0f}")
print("smallest normal:", 2.0 ** -6, "  the values in [1, 2):", positive[(positive >= 1) & (positive < 2)].tolist())
fig, ax = plt.subplots(figsize=(9, 2.2))
ax.plot(positive, torch.zeros_like(positive), "|", markersize=15)
ax.set_xscale("log", base=2)
ax.set_yticks([])
ax.set_title("positive E4M3 values (log scale): 8 per octave, down to 2^-9")
fig.tight_layout()

# %% [markdown]
# ## 2. Why per-tile scales: activations with outliers
#
# LLM activations carry a few channels thousands of times larger than the rest. With one scale
# for the whole tensor, the outliers set the scale, and the ordinary values land far down E4M3's
# range: the smallest of them in its coarse subnormals (below $2^{-6}$, fewer mantissa bits) or at
# zero, since 17 octaves are not enough for both. Not every ordinary value suffers; the histogram
# counts how many end up rounded worse than 1/16, E4M3's worst case for a normal number. With one
# scale per token per 128 channels, only the tiles that hold an outlier pay.

# %%
x = torch.randn(64, 1024)
x[:, [7, 300]] *= 3000                                    # two "massive activation" channels
per_tensor_scale = x.abs().max() / 448
x_tensor = (x / per_tensor_scale).to(E4M3).float() * per_tensor_scale
xq, xs = quantize_activation(x)                           # 1 x 128 tiles
x_tile = (xq.float().reshape(64, 8, 128) * xs[..., None]).reshape(64, 1024)
ordinary = torch.ones(1024, dtype=torch.bool)
ordinary[[7, 300]] = False
err_tensor = ((x_tensor - x).abs() / x.abs())[:, ordinary].flatten()
err_tile = ((x_tile - x).abs() / x.abs())[:, ordinary].flatten()
fig, ax = plt.subplots(figsize=(7, 3))
bins = torch.logspace(-5, 0.5, 60)
beyond = {name: (e > 1 / 16).float().mean().item() for name, e in (("tensor", err_tensor), ("tile", err_tile))}
ax.hist(err_tensor.clamp(1e-5, 3), bins=bins, alpha=0.6,
        label=f"per-tensor scale: {beyond['tensor']:.1%} worse than 1/16")
ax.hist(err_tile.clamp(1e-5, 3), bins=bins, alpha=0.6, label=f"1x128 tile scales: {beyond['tile']:.1%} worse than 1/16")
ax.axvline(1 / 16, color="k", lw=0.8, ls="--")
ax.set_xscale("log")
ax.set_xlabel("relative error of an ordinary activation")
ax.set_ylabel("activations (count)")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## 3. Weights: 128 x 128 blocks, and the GEMM
#
# The published rule: dequantized weight = FP8 block x `weight_scale_inv` of that block (edge blocks
# padded, then cropped). The block-scaled GEMM multiplies FP8 operands per 128-wide slice of K,
# scales each slice's sum by both scales, and adds the slices in float32.

# %%
w = torch.randn(300, 1024) * 0.02                         # 300 rows: the last block row is partial
wq, ws = quantize_weight(w)
print("weight", tuple(wq.shape), wq.dtype, "scales", tuple(ws.shape))
block_scale = ws.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300]
half_ulp = torch.maximum(w.abs() / 16, block_scale * 2.0 ** -10)   # normals: 1/16 relative; subnormals: absolute
w_err = ((dequantize_weight(wq, ws) - w).abs() / half_ulp).max().item()
y_fp8 = fp8_matmul(xq, xs, wq, ws)
y_ref = x @ w.T
gemm_err = ((y_fp8 - y_ref).norm() / y_ref.norm()).item()
print(f"largest weight error, in half E4M3 ulps: {w_err:.3f}; FP8 GEMM vs float32: {gemm_err:.4f} (normwise)")

# %% [markdown]
# `fp8_matmul` is the oracle: it computes each block's sum of FP8 products exactly (in float64).
# The same GEMM also runs through torch's own FP8 kernel, `torch.nn.functional.scaled_mm`: on an H100
# or H200 as a single cuBLAS call that takes our scales as they are (1 x 128 tiles for activations,
# 128 x 128 blocks for weights); on a CPU, whose kernel knows only per-row scales, as one call per
# 128-wide slice of K. Both must agree with the oracle to float32 rounding.

# %%
y_kernel = fp8_matmul_scaled_mm(xq, xs, wq, ws)
kernel_err = ((y_kernel - y_fp8).abs().max() / y_fp8.abs().max()).item()
print(f"scaled_mm on this machine runs as {scaled_mm_recipe('cpu')!r}; largest difference from the oracle: "
      f"{kernel_err:.1e} of the largest output")

# %% [markdown]
# A CPU has no FP8 arithmetic, so its fast path is a third one (`fp8_kernel="dequantize"`, for
# inference and for FP8 training): take the same E4M3 operands, multiply each by its scale (the
# 1 x 128 tile's or the 128 x 128 block's) and run one float32 GEMM. The quantization is the same to
# the bit; only the sum over K changes, from exact 128-wide slices added in float32 to the BLAS's
# float32 order. That moves the result by float32 rounding, far less than E4M3's own step.

# %%
y_deq = fp8_matmul_dequantized(xq, xs, wq, ws)
deq_err = ((y_deq - y_fp8).abs().max() / y_fp8.abs().max()).item()
print(f"dequantize: largest difference from the oracle {deq_err:.1e} of the largest output "
      f"(E4M3's step: {2 ** -4:.1e})")

# %% [markdown]
# ## 4. Accumulation precision
#
# Each product of two E4M3 numbers is exact, but Hopper tensor cores add them into an accumulator
# of about 14 mantissa bits. `limited_precision_dot` adds the exact products one by one into such an
# accumulator (truncating after each addition), optionally moving the partial sum into a float32
# total every 128 elements, as DeepSeek-V3's kernels do.

# %%
a = torch.randn(48, 4096).to(E4M3).float()
b = torch.randn(48, 4096).to(E4M3).float()
ks = [128, 512, 1024, 2048, 4096]
curves = {}
for bits in (12, 14, 16):
    for promote in (None, 128):
        errs = []
        for k in ks:
            exact = (a[:, :k].double() * b[:, :k].double()).sum(-1)
            got = limited_precision_dot(a[:, :k], b[:, :k], bits, promote)
            errs.append(((got - exact).norm() / exact.norm()).item())
        curves[(bits, promote)] = errs
fig, ax = plt.subplots(figsize=(7, 3.5))
for (bits, promote), errs in curves.items():
    ax.plot(ks, errs, marker="o", ls="-" if promote is None else "--",
            color={12: "C3", 14: "C0", 16: "C2"}[bits],
            label=f"{bits}-bit accumulator" + (", promoted every 128" if promote else ""))
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("K (inner dimension)")
ax.set_ylabel("relative error of the dot products")
ax.legend(fontsize=7)
fig.tight_layout()
print(f"14 bits at K=4096: {curves[(14, None)][-1]:.3f} without promotion, {curves[(14, 128)][-1]:.5f} with")

# %% [markdown]
# ## 5. A tiny model in fp32, bf16 and FP8
#
# A tiny checkpoint converted to FP8 with `python -m dsv3ref.convert bf16-to-fp8` (here called as a
# function), then run three ways on the same input.

# %%
cfg = ModelConfig.preset("tiny").replace(hidden_size=256, intermediate_size=384)
model = DeepseekV3(cfg).eval()
folder = tempfile.mkdtemp()
dsv3ref.save_pretrained(model, f"{folder}/fp32")
convert(f"{folder}/fp32", f"{folder}/fp8", "bf16-to-fp8")
ids = torch.randint(0, cfg.vocab_size, (2, 24))
reference = dsv3ref.trace(model, ids)
runs = {
    "bf16 weights and compute": DeepseekV3.from_pretrained(f"{folder}/fp32", dtype=torch.bfloat16),
    "FP8 weights, dequantized": DeepseekV3.from_pretrained(f"{folder}/fp8"),
    "FP8 weights and activations": DeepseekV3.from_pretrained(f"{folder}/fp8", gemm_impl="fp8"),
}
first_layer, results = {}, {}
for name, m in runs.items():
    result = dsv3ref.compare(reference, dsv3ref.trace(m, ids), rtol=0.02)
    rows = {r.key: r for r in result.rows}
    first_layer[name] = rows["model.layers.0"].max_rel
    results[name] = result
    print(f"{name:30s} layer 0 output {first_layer[name]:.4f}   logits {rows['lm_head'].max_rel:.3f}   "
          f"routing flips {sum(result.routing_flips.values())} of {len(result.routing_flips) * 48} choices")


# %% [markdown]
# Layer 0 (a dense layer) shows the format's own error: bf16's 8 mantissa bits against E4M3's 3.
# Further in, a freshly initialized router scores all experts almost equally, so any rounding flips
# a few tokens to other experts, and those tokens' outputs change completely: that, not the number
# format, is what moves the logits here (compare them with `dsv3ref.compare`'s routing column).
#
# That is a property of this untrained model. What made FP8 *training* work at DeepSeek-V3's scale
# is in the report's section 3.3: fine-grained scaling (1 x 128 activation tiles and 128 x 128
# weight blocks, as here), promoting partial sums to float32 every 128 elements (section 4 above),
# and keeping the sensitive operators in higher precision: the embedding, the output head, the MoE
# gating, the normalizations and the attention operators stay in BF16 or FP32. With these, the
# report measures a relative loss difference below 0.25% against BF16 training.

# %% [markdown]
# ## 6. Two FP8 attention paths: which one to compare a kernel against
#
# With FP8 weights, the two attention implementations are two different computations, exactly as in
# DeepSeek's own `inference/model.py`:
#
# - `attn_impl="naive"` is DeepSeek's naive path: `kv_b_proj` runs as the block-scaled FP8 GEMM, so
#   the latent $c^{KV}$ is first quantized in 1 x 128 tiles;
# - `attn_impl="absorb"` is DeepSeek's absorb path: `kv_b_proj`'s weight is dequantized and applied to
#   the latent in the activation dtype. The latent is never quantized, whichever order
#   (absorbed or expanded) a chunk is computed in.
#
# So a kernel that keeps the latent in bf16 (every MLA decode kernel does) should be compared with
# `absorb`. Each path gives the same logits however the tokens are fed: one chunk or one at a time.
# Between the two paths the logits of this untrained model differ a lot: the latent's quantization
# error is a few percent, and near-tied routers turn it into different experts (section 5).

# %%
def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def fed(model, chunks):
    cache = model.new_cache(1, 24)
    out, p = [], 0
    for c in chunks:
        out.append(model(ids[:1, p:p + c], cache=cache, start_pos=p))
        p += c
    return torch.cat(out, dim=1)


paths = {impl: DeepseekV3.from_pretrained(f"{folder}/fp8", gemm_impl="fp8", attn_impl=impl)
         for impl in ("naive", "absorb")}
with torch.no_grad():
    whole = {impl: fed(m, [24]) for impl, m in paths.items()}
    chunking_err = {impl: rel(fed(m, [1] * 24), whole[impl]) for impl, m in paths.items()}
    latent_quantization = rel(whole["absorb"], whole["naive"])
for impl, err in chunking_err.items():
    print(f"{impl:6s}: one chunk vs one token at a time, max relative difference {err:.1e}")
print(f"naive vs absorb (the latent quantized or not): {latent_quantization:.1e}")

# %% [markdown]
# ## Checks

# %%
assert positive.max() == 448 and positive.min() == 2.0 ** -9 and len(positive) == 126
assert beyond["tile"] < beyond["tensor"] / 5                     # tiles keep ordinary values; a tensor scale loses them
assert w_err <= 1 + 1e-5                                          # every weight within half an E4M3 ulp
assert gemm_err < 0.05
assert kernel_err < 1e-6                                          # torch's FP8 kernel computes the oracle's formula
assert 0 < deq_err < 1e-6                                         # so does the dequantized GEMM, to float32 rounding
assert 5e-3 < curves[(14, None)][-1] < 5e-2                       # ~1-2% at K = 4096 with 14 bits
assert curves[(14, 128)][-1] < 1e-3                               # promotion every 128 removes it
assert curves[(14, None)][-1] > 5 * curves[(14, None)][0]         # and the error grows with K
assert first_layer["bf16 weights and compute"] < 0.01                   # bf16: 2^-8 per rounding
assert first_layer["FP8 weights, dequantized"] < 2 ** -3               # E4M3: 2^-4 per rounding
assert first_layer["FP8 weights and activations"] < 2 ** -2
assert first_layer["bf16 weights and compute"] < first_layer["FP8 weights, dequantized"]
assert max(chunking_err.values()) < 1e-5                          # each FP8 path is independent of chunking
assert latent_quantization > 1e-3                                 # and the two paths are different computations
print("all checks passed")

# %% [markdown]
# **Exercise:** [e06_block_quantization.ipynb](exercises/e06_block_quantization.ipynb): write 128x128 weight blocks and 1x128 activation tiles in E4M3 yourself; `dsv3ref`
# checks it and says where it first differs.
#
# **Next:** [07_text.ipynb](07_text.ipynb), Text in, text out: the tokenizer, the chat template, a
# streamed reply.
