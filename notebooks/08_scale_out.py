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
# # 08 · From one process to sixteen GPUs
#
# *Lesson 8 of the dsv3ref course (lessons 00 to 09), after [07_text](07_text.ipynb) (text in, text out).*
#
# **What this notebook teaches.** The released DeepSeek-V3 is 688.6 GB of FP8 weights: no GPU holds
# it. Here the same readable model is split over processes with `torch.distributed`: attention heads,
# FFN widths and the vocabulary cut across ranks (tensor parallelism), the 256 routed experts dealt out
# whole (expert parallelism), tokens brought to their experts by an all-reduce or an all-to-all.
# We draw which tensor is split how, run the split model in 2 and 4 CPU processes launched with
# torchrun and check its logits against one process, count the bytes each scheme moves per decode
# step, ask the memory planner which machines hold the full model, and end with the exact commands
# that run the published checkpoint on 8x H200 and on two 8-GPU nodes.
#
# Report sections: DeepSeek-V3 §3.1-3.2 (compute clusters, DualPipe and all-to-all communication),
# §3.4 (inference and deployment: prefilling and decoding units, redundant experts).

# %%
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig
from dsv3ref.parallel.layers import split_range
from dsv3ref.parallel.planner import GPU_MEMORY, cache_bytes_per_token, checkpoint_bytes, machine_table, weight_bytes

full = ModelConfig.preset("deepseek-v3")
size, elements = checkpoint_bytes(full)
print(f"the release: {size:,} bytes, {elements:,} elements (the model card's '685B': 671B + the MTP module)")

# %% [markdown]
# ## 1. Which tensor is split how
#
# A linear layer y = x Wᵀ splits two ways. **Column-parallel**: each rank keeps some rows of W (some
# output features) and computes those outputs from the whole x; nothing is exchanged. **Row-parallel**:
# each rank keeps some columns of W and the matching slice of x; every rank's product is a partial
# sum, and an **all-reduce** adds them. Put a column-parallel layer before a row-parallel one and the
# slice the second needs is exactly what the first produced: one all-reduce per block.
#
# DeepSeek's inference code applies this per head in attention (`q_b_proj` and `kv_b_proj` by rows,
# `o_proj` by columns), to the dense FFNs and the shared expert (`gate_proj`, `up_proj` by rows,
# `down_proj` by columns), to the vocabulary (embedding rows, all-reduced; LM head rows, logits
# gathered), and hands each rank E / world whole routed experts. The small projections into the latents
# (`q_a_proj`, `kv_a_proj_with_mqa`), the norms and the router stay whole on every rank. The picture
# shows the parts of the 8 ranks of one node, for the full model:

# %%
rows = [("embed_tokens / lm_head (vocab)", full.vocab_size, 1), ("q_b_proj (128 heads x 192 rows)", 128, 1),
        ("kv_b_proj (128 heads x 256 rows)", 128, 1), ("o_proj (columns, by head)", 128, 1),
        ("dense FFN width (FP8: 128-blocks)", full.intermediate_size, 128),
        ("shared expert width (128-blocks)", full.moe_intermediate_size, 128),
        ("routed experts (whole)", full.n_routed_experts, 1), ("q_a_proj, kv_a_proj, norms, router", 1, None)]
fig, axes = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
for ax, world in zip(axes, (8, 32), strict=True):
    colors = plt.cm.tab20.colors if world > 10 else plt.cm.tab10.colors
    for y, (_, total, unit) in enumerate(rows):
        if unit is None:
            ax.barh(y, 1, color="lightgray", edgecolor="white")
            ax.text(0.5, y, "replicated on every rank", ha="center", va="center", fontsize=8)
            continue
        for r in range(world):
            start, stop = split_range(total, world, r, unit)
            ax.barh(y, (stop - start) / total, left=start / total, color=colors[r % len(colors)], edgecolor="white")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"{world} GPUs, layout 'tp' (colour: the rank holding that part)", fontsize=10)
axes[-1].set_xlabel("fraction of the tensor")
plt.tight_layout()
plt.show()

# %% [markdown]
# At 8 GPUs every split is even. At 32 the FP8 FFNs are cut on their 128x128 scale grid: the dense
# FFN's 144 blocks give 16 ranks 5 blocks and 16 ranks 4, and the shared expert's 16 blocks give half
# the ranks one block and half none (a rank with no part of a layer skips it; the all-reduce still
# adds the others'). DeepSeek's own converter stops at 16 ranks for this reason.

# %% [markdown]
# ## 2. Run it: 2 and 4 processes against one
#
# `dsv3ref.parallel.parallelize` applies that plan to the model from outside: modules keep their
# classes and checkpoint names, weights are narrowed, and the collectives are forward hooks (row-parallel
# outputs all-reduced, vocabulary logits gathered) plus one replaced module per MoE layer. The sharded
# loader `dsv3ref.parallel.from_pretrained` builds the model on the meta device, applies the plan, and
# reads only this rank's slice of every tensor from the safetensors shards (`get_slice`): no rank ever
# holds another's part.
#
# We save a tiny random checkpoint and launch `dsv3ref.parallel.selfcheck` with torchrun, gloo on the
# CPU: every rank loads its part and the whole model in float64, runs the same tokens through both,
# greedy-decodes, and rank 0 reports the largest difference and the bytes each rank read.

# %%
tmp = Path(tempfile.mkdtemp())
cfg = ModelConfig.preset("tiny")
torch.manual_seed(0)
dsv3ref.save_pretrained(DeepseekV3(cfg), tmp / "tiny", max_shard_bytes=300_000)


def torchrun(n, *args):
    """Launch n processes of dsv3ref.parallel.selfcheck; return rank 0's JSON report."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(29500 + n),
           "-m", "dsv3ref.parallel.selfcheck", str(tmp / "tiny"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


runs = {}
for n, layout, comm in [(2, "tp", "allreduce"), (2, "tp", "alltoall"), (4, "tp", "allreduce"), (4, "dp", "alltoall")]:
    runs[n, layout, comm] = r = torchrun(n, "--layout", layout, "--moe-comm", comm)
    print(f"{n} ranks, layout {layout}, {comm:9}: logits rel. error {r['logits_rel_err']:.1e}, same greedy tokens: "
          f"{r['tokens_equal']}, bytes read per rank {r['bytes_read_per_rank']} of {r['checkpoint_bytes']:,}")

# %% [markdown]
# The split model computes what one process computes, to float64 rounding: splitting only regroups
# sums. Under "tp" each rank reads a bit more than 1/world of the file (the replicated tensors are read
# by all); under "dp" (data-parallel attention) each rank reads everything except other ranks' experts.

# %% [markdown]
# ## 3. All-reduce or all-to-all: what moves per decode step
#
# **allreduce** (DeepSeek's inference code): every GPU holds every token, runs its own experts on
# the tokens that chose them, and an all-reduce of the (tokens, 7168) hidden state adds the GPUs'
# shares; tensor-parallel attention needs one more all-reduce per layer (o_proj) and the shared expert
# another. A ring all-reduce of B bytes sends 2 (W-1)/W * B bytes from each GPU.
#
# **alltoall** (DeepEP, SGLang, the report's §3.2): each GPU holds *its own* tokens (data-parallel
# attention: its own batch rows, its own latent cache, replicated attention weights). A token's
# hidden state travels only to the GPUs holding one of its 8 chosen experts (dispatch), and the
# results come back (combine): 2 x 8 x (W-1)/W x 7168 x 2 bytes per token at most, and attention
# moves nothing. Per GPU and per token of the whole batch:

# %%
def bytes_per_token(world, scheme, cfg=full):
    """Bytes each GPU sends per token of the global batch in one decode step (BF16 activations)."""
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    moe = sum(cfg.is_moe_layer(i) for i in range(layers))
    ring = 2 * (world - 1) / world * d * 2                  # one ring all-reduce of a token's hidden state
    if scheme == "tp + allreduce":                           # o_proj, dense/shared FFN, routed experts
        return layers * 2 * ring + moe * ring
    per_own_token = 2 * cfg.num_experts_per_tok * (world - 1) / world * d * 2  # dispatch + combine
    return moe * per_own_token / world                       # each GPU sends only its own 1/world of the tokens


worlds = [8, 16, 32, 64]
schemes = ["tp + allreduce", "dp + alltoall"]
for s in schemes:
    print(f"{s:15}", "  ".join(f"W={w}: {bytes_per_token(w, s) / 1e6:5.2f} MB" for w in worlds))
fig, ax = plt.subplots(figsize=(6, 3))
for s in schemes:
    ax.plot(worlds, [bytes_per_token(w, s) / 1e6 for w in worlds], marker="o", label=s)
ax.set_xlabel("GPUs")
ax.set_ylabel("MB sent per GPU per token")
ax.set_xscale("log", base=2)
ax.set_title("Communication of one decode step, per token of the batch")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The all-reduce sends the whole hidden state around the ring three times per layer, whatever the
# routing; the all-to-all sends each token to at most 8 expert holders, and with data-parallel
# attention each GPU only sends its own tokens. That, and the cache below, is why serving systems
# pair expert parallelism with DP attention. (The report's deployment also limits each token to 4
# nodes and overlaps communication with computation; neither changes what is computed.)

# %% [markdown]
# ## 4. How many GPUs, how much memory?
#
# `dsv3ref.plan` counts the weight bytes each GPU holds exactly from the configuration's shapes and
# the release's dtypes (FP8 projections with float32 128x128 block scales, BF16 embedding, head,
# norms and router, float32 router bias); the tests hold it equal to the split model built on the
# meta device. The latent cache is 70,272 bytes per token (61 layers x 576 BF16 numbers): with
# tensor-parallel attention every GPU holds the latent of every sequence (it is shared by all heads, so
# it cannot be split by heads); with DP attention each GPU holds only its own sequences'.

# %%
print(f"latent cache: {cache_bytes_per_token(full):,} bytes per token")
table = machine_table(full, batch_size=32, seq_len=4096)
print(f"{'machine':15} {'gemm':4} {'layout':6} {'weights GB':>10} {'cache tokens, all GPUs':>22}  fits")
for r in table:
    print(f"{r['machine']:15} {r['gemm_impl']:4} {r['layout']:6} {r['weights_gb']:10.1f} "
          f"{r['tokens_fit_total']:22,}  {'yes' if r['fits'] else 'NO'}")

fig, ax = plt.subplots(figsize=(6, 3))
for layout in ("tp", "dp"):
    ax.plot(worlds, [weight_bytes(full, w, 0, layout, "fp8") / 1e9 for w in worlds], marker="o",
            label=f"FP8 weights per GPU, layout {layout}")
for gpu in ("H100-80GB", "H200-141GB"):
    ax.axhline(GPU_MEMORY[gpu] / 1e9, ls="--", color="gray")
    ax.text(60, GPU_MEMORY[gpu] / 1e9 + 2, gpu, ha="right", fontsize=8)
ax.set_xscale("log", base=2)
ax.set_xlabel("GPUs")
ax.set_ylabel("GB per GPU")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# DP attention costs weight memory (attention, dense layers and embeddings on every GPU: 100.8 GB
# instead of 85.1 GB at 8 GPUs) and gains cache capacity (each GPU caches only its own sequences, so
# the system holds about world-size times more tokens). One 8x H100 node cannot hold the FP8 model
# (85.1 GB per GPU); two can, and 8x H200 can with room for about 840,000 cached tokens.

# %% [markdown]
# ## 5. The commands
#
# On one node with 8 H200 (NCCL; every rank reads its 1/8 of the 163 shards, with a progress bar on
# rank 0):
#
# ```
# torchrun --nproc-per-node 8 -m dsv3ref generate --ckpt-path /data/DeepSeek-V3 \
#     --gemm-impl fp8 --fp8-kernel scaled_mm --prompt "Hello!"
# torchrun --nproc-per-node 8 -m dsv3ref chat --ckpt-path /data/DeepSeek-V3 --gemm-impl fp8 --fp8-kernel scaled_mm
# ```
#
# On two nodes of 8 H100 or H800 (run on each node, with its `--node-rank`; the rendezvous is the
# first node's address):
#
# ```
# torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 \
#     --rdzv-backend c10d --rdzv-endpoint $FIRST_NODE:29500 \
#     -m dsv3ref generate --ckpt-path /data/DeepSeek-V3 --gemm-impl fp8 --fp8-kernel scaled_mm \
#     --layout dp --moe-comm alltoall --prompt "Hello!"
# ```
#
# `python -m dsv3ref plan` prints the table above; `--world-size 16 --gpu-memory-gib 79.6` one plan.

# %% [markdown]
# ## Checks

# %%
assert (size, elements) == (688_574_839_360, 684_531_386_000)
assert all(r["logits_rel_err"] < 1e-10 and r["tokens_equal"] for r in runs.values())
assert runs[4, "tp", "allreduce"]["bytes_read_per_rank"][0] < runs[2, "tp", "allreduce"]["bytes_read_per_rank"][0]
assert bytes_per_token(16, "dp + alltoall") < bytes_per_token(16, "tp + allreduce")
fits = {(r["machine"], r["layout"]): r["fits"] for r in table}
assert fits["1x8 H200-141GB", "tp"] and fits["2x8 H100-80GB", "tp"] and not fits["1x8 H100-80GB", "tp"]
assert round(weight_bytes(full, 8) / 1e9, 1) == 85.1 and round(weight_bytes(full, 16) / 1e9, 1) == 43.1
print("all checks passed")

# %% [markdown]
# **Next:** [09_training.ipynb](09_training.ipynb), Training: the bias update, the MTP objective and FP8,
# measured on a small model trained in a minute.
