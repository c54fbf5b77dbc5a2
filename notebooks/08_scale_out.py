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
# step, ask the memory planner which machines hold the full model, check the plan by running the
# launch's code on fake tensors, and end with the exact commands that run the published checkpoint on
# 8x H200 and on two 8-GPU nodes.
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
from matplotlib.ticker import NullFormatter, ScalarFormatter

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig, count_parameters
from dsv3ref.parallel.layers import split_range
from dsv3ref.parallel.planner import GPU_MEMORY, cache_bytes_per_token, checkpoint_bytes, machine_table, weight_bytes

full = ModelConfig.preset("deepseek-v3")
size, elements = checkpoint_bytes(full)
mtp = count_parameters(full)
print(f"the release: {size:,} bytes, {elements:,} elements (the model card's '685B': 671B + the MTP module, whose "
      f"{mtp.mtp / 1e9:.1f}B are stored with their own copies of the embedding and head: "
      f"{(mtp.mtp + mtp.embedding + mtp.head) / 1e9:.1f}B, the card's '14B')")

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
# shares (routed and shared experts in one sum); tensor-parallel attention needs one more all-reduce
# per layer (o_proj), and so does each dense FFN. A ring all-reduce of B bytes sends 2 (W-1)/W * B
# bytes from each GPU.
#
# **alltoall** (DeepEP, SGLang, the report's §3.2): each GPU holds *its own* tokens (data-parallel
# attention: its own batch rows, its own latent cache, replicated attention weights). A token's
# hidden state travels once to each GPU holding one of its 8 chosen experts (dispatch), with its
# slots' expert ids and gate values, and each of those GPUs sends back the sum of its slots
# (combine). The group limit bounds the GPUs a token reaches: its 8 experts come from 4 of the 8
# groups, so on one node (a group per GPU) at most 4 of the 8 GPUs; attention moves nothing.
#
# `dsv3ref.parallel.planner.exchange_bytes` counts the bytes one GPU hands to each collective in a
# forward pass; the tests hold it equal, byte for byte, to what the code hands to torch's collectives
# (tests/test_parallel.py at 2 and 4 ranks, tests/test_simulate.py at full size). From it, what each
# GPU sends to the others in one decode step of 256 sequences (BF16 activations, balanced routing),
# per sequence:

# %%
from dsv3ref.parallel.planner import destinations, exchange_bytes


def sent_per_token(world, layout, comm, batch=256):
    """Bytes each GPU sends to other GPUs in one decode step of `batch` sequences, per sequence."""
    tokens = batch if layout == "tp" else batch // world      # dp: each GPU decodes its own sequences
    handed = exchange_bytes(full, world, layout, comm, tokens, tokens)
    others = (world - 1) / world
    sent = (handed.get("all_reduce", 0) * 2 * others               # ring all-reduce
            + handed.get("all_gather_into_tensor", 0) * (world - 1)  # its part to each other GPU
            + handed.get("reduce_scatter_tensor", 0) * others        # all parts but its own
            + handed.get("all_to_all_single", 0) * others)           # balanced: 1/world stays here
    return sent / batch


worlds = [8, 16, 32, 64]
schemes = [("tp", "allreduce"), ("tp", "alltoall"), ("dp", "allreduce"), ("dp", "alltoall")]
print("GPUs a token's hidden state reaches at most:", {w: destinations(full, w) for w in worlds})
for layout, comm in schemes:
    print(f"{layout} + {comm:9}", "  ".join(f"W={w}: {sent_per_token(w, layout, comm) / 1e6:6.2f} MB" for w in worlds))
fig, ax = plt.subplots(figsize=(6, 3))
for layout, comm in schemes:
    ax.plot(worlds, [sent_per_token(w, layout, comm) / 1e6 for w in worlds], marker="o", label=f"{layout} + {comm}")
ax.set_xlabel("GPUs")
ax.set_ylabel("MB sent per GPU per sequence")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.yaxis.set_major_formatter(ScalarFormatter())
ax.yaxis.set_minor_formatter(NullFormatter())
ax.set_title("Communication of one decode step (BF16)")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What the numbers show: with tensor-parallel attention every GPU sends the whole hidden state of
# every sequence around the ring about twice per layer, whatever the routing, and the all-to-all
# does not help there: attention's all-reduces remain, and the slices each GPU dispatched must be
# gathered again (3.3 MB against 4.0 MB per sequence at 8 GPUs). Data-parallel attention with the all-to-all exchange
# sends each token only to the few GPUs holding its experts and only from its own GPU: 0.7 MB per
# sequence at 8 GPUs, and once the group limit stops widening (8 destinations from 16 GPUs on) it
# falls as GPUs are added, where the others stay flat. Data-parallel attention with the all-reduce
# exchange sits between: attention moves nothing, but every GPU gathers every token. That, and the cache below, is why serving
# systems pair expert parallelism with DP attention. Not built here: the report's FP8 dispatch
# (§3.3.4: activations quantized to FP8 before the all-to-all, about half these bytes) and the
# overlap of communication with computation; the exchange here is BF16, as the model computes.

# %% [markdown]
# ## 4. How many GPUs, how much memory?
#
# `dsv3ref.plan` counts each GPU's memory from the configuration: the weights exactly, from the
# shapes and the release's dtypes (FP8 projections with float32 128x128 block scales, BF16 embedding,
# head, norms and router, float32 router bias); the latent cache, 70,272 bytes per token (61 layers x
# 576 BF16 numbers; with tensor-parallel attention every GPU holds every sequence's latent, which all
# heads share; with DP attention only its own sequences'); the activations of the largest prefill
# pass (prompts are prefilled 2048 tokens a pass: scores, expert buffers) and of a decode step; and
# 3 GiB kept free for the CUDA context and NCCL. Sizes in GiB (2^30 bytes), as GPUs report memory.

# %%
GIB = 2**30
print(f"latent cache: {cache_bytes_per_token(full):,} bytes per token")
table = machine_table(full, batch_size=32, seq_len=4096)
print(f"{'machine':15} {'gemm':4} {'layout':6} {'weights':>8} {'used':>6} {'GPU':>6} {'cache tokens, all GPUs':>22}  fits")
for r in table:
    print(f"{r['machine']:15} {r['gemm_impl']:4} {r['layout']:6} {r['weights_gib']:8.1f} {r['used_gib']:6.1f} "
          f"{r['gpu_gib']:6.1f} {r['tokens_fit_total']:22,}  {'yes' if r['fits'] else 'NO'}")

fig, ax = plt.subplots(figsize=(6, 3))
for layout in ("tp", "dp"):
    ax.plot(worlds, [weight_bytes(full, w, 0, layout, "fp8") / GIB for w in worlds], marker="o",
            label=f"FP8 weights per GPU, layout {layout}")
for gpu in ("H100-80GB", "H200-141GB"):
    ax.axhline(GPU_MEMORY[gpu] / GIB, ls="--", color="gray")
    ax.text(60, GPU_MEMORY[gpu] / GIB + 2, gpu, ha="right", fontsize=8)
ax.set_xscale("log", base=2)
ax.set_xlabel("GPUs")
ax.set_ylabel("GiB per GPU")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
rows8 = {r["layout"]: r for r in table if r["machine"] == "1x8 H200-141GB"}
print(f"8x H200: weights {rows8['tp']['weights_gib']:.1f} GiB (tp) against {rows8['dp']['weights_gib']:.1f} GiB (dp); "
      f"cache tokens, all GPUs: {rows8['tp']['tokens_fit_total']:,} (tp) against {rows8['dp']['tokens_fit_total']:,} (dp)")

# %% [markdown]
# DP attention costs weight memory (attention, dense layers and embeddings on every GPU) and gains
# cache capacity (each GPU caches only its own sequences, so the system holds about four times more
# tokens on one node). One 8x H100 node cannot hold the FP8 model (the weights alone are 79.3 GiB of
# the 79.6 a GPU has); two can, and one 8x H200 node can, with room for the cache of about 860,000
# tokens.
#
# ### Checked by running the launch on fake tensors
#
# A plan is a count; `dsv3ref.parallel.simulate` runs the code a launch runs instead: the loader on
# the release's headers, `new_cache`, the last prefill pass and a decode step, for one rank of a
# world of any size (torch's fake process group), under `FakeTensorMode` (tensors with shapes and
# no data) on a simulated H200, counting every byte alive. Here on a small model of the same layout
# (3 layers, FP8), rank 0 of 4; `python -m dsv3ref plan --world-size 8 --simulate` does it for the
# full model in about a minute (tests/test_simulate.py holds it, with the collectives counted above).

# %%
from dsv3ref.parallel import Parallel
from dsv3ref.parallel.planner import plan
from dsv3ref.parallel.simulation import simulate

small = ModelConfig.preset("small").replace(num_hidden_layers=3, quantization_config=full.quantization_config)
sims, plans = {}, {}
for layout, comm in (("tp", "allreduce"), ("dp", "alltoall")):
    sims[layout] = simulate(small, 4, 0, Parallel(layout, comm), batch_size=8, seq_len=512)
    plans[layout] = plan(small, 4, layout, "fp8", 100.0, 8, 512, moe_comm=comm)
fig, ax = plt.subplots(figsize=(6, 3))
parts = ("weights", "cache", "activations")
for i, layout in enumerate(sims):
    s, p = sims[layout], plans[layout]
    planned = (p.weights, p.cache, p.activations + p.derived)
    counted = (s.weights, s.cache, s.activations)
    for j, (values, hatch) in enumerate(((planned, ""), (counted, "//"))):
        bottom = 0
        for part, v, color in zip(parts, values, ("tab:blue", "tab:orange", "tab:green"), strict=True):
            ax.bar(2.5 * i + j, v / 2**20, bottom=bottom, color=color, hatch=hatch, edgecolor="white",
                   label=part if (i, j) == (0, 0) else None)
            bottom += v / 2**20
    print(f"layout {layout}: plan {(p.used - p.reserve) / 2**20:.1f} MiB, simulated peak {s.peak / 2**20:.1f} MiB "
          f"({(p.used - p.reserve) / s.peak:.3f}x); impl {s.impl.gemm_impl} through {s.impl.fp8_kernel}")
ax.set_xticks([0, 1, 2.5, 3.5], ["tp: plan", "tp: run", "dp: plan", "dp: run"])
ax.set_ylabel("MiB on rank 0 of 4")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Weights and cache are counted exactly; the plan's activations are a bound from above (everything
# that could be alive together counted at once), a few percent above the peak the code reaches. For
# the full model at 8 GPUs and 32 prompts of 4096 tokens, the same run gives 89.7 GiB at the peak of a
# prefill pass, and the plan is 1.001x that.

# %% [markdown]
# ## 5. The commands
#
# On one node with 8 H200: the checkpoint's folder is all a launch needs.
#
# ```
# torchrun --nproc-per-node 8 -m dsv3ref generate --ckpt-path /data/DeepSeek-V3 --prompt "Hello!"
# torchrun --nproc-per-node 8 -m dsv3ref chat --ckpt-path /data/DeepSeek-V3
# ```
#
# Its defaults are the plan above: the FP8 weights stay FP8 and are multiplied by torch's blockwise
# `scaled_mm` (on an SM90 GPU; the exact emulation elsewhere), activations and cache in BF16, prompts
# prefilled 2048 tokens a pass, the MTP module left unread (`--speculative` loads it). Before anything
# is read, every rank compares the plan with its GPU's free memory and stops with the flags that
# would fit; each rank reads its 1/8 of the 163 shards (progress on rank 0), and the ranks wait for
# each other after loading for at most `--load-timeout` (an hour), so a slow disk is told from a lost
# rank. The first line printed says how the model computes.
#
# On two nodes of 8 H100 or H800 (run on each node, with its `--node-rank`; the rendezvous is the
# first node's address):
#
# ```
# torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 \
#     --rdzv-backend c10d --rdzv-endpoint $FIRST_NODE:29500 \
#     -m dsv3ref generate --ckpt-path /data/DeepSeek-V3 --layout dp --moe-comm alltoall --prompt "Hello!"
# ```
#
# `python -m dsv3ref plan` prints the table above; `--world-size 16 --gpu-memory-gib 79.6` one plan,
# and `--simulate` beside it what the code allocates. What this lesson ran: the split model in 2 and 4
# CPU processes, the counts, and the small simulation; what it only describes: the GPU runs
# (`benchmarks/gpu_checks.sh` measures them on a GPU machine).

# %% [markdown]
# ## Checks

# %%
assert (size, elements) == (688_574_839_360, 684_531_386_000)
assert all(r["logits_rel_err"] < 1e-10 and r["tokens_equal"] for r in runs.values())
assert runs[4, "tp", "allreduce"]["bytes_read_per_rank"][0] < runs[2, "tp", "allreduce"]["bytes_read_per_rank"][0]
assert sent_per_token(16, "dp", "alltoall") < sent_per_token(16, "tp", "allreduce")
assert destinations(full, 8) == 4 and destinations(full, 16) == 8
fits = {(r["machine"], r["layout"]): r["fits"] for r in table}
assert fits["1x8 H200-141GB", "tp"] and fits["2x8 H100-80GB", "tp"] and not fits["1x8 H100-80GB", "tp"]
assert round(weight_bytes(full, 8) / 1e9, 1) == 85.1 and round(weight_bytes(full, 16) / 1e9, 1) == 43.1
for layout in sims:  # the simulated launch: weights and cache as counted, activations bounded from above
    s, p = sims[layout], plans[layout]
    assert s.weights == p.weights and s.cache == p.cache and 1 <= (p.used - p.reserve) / s.peak < 1.12
print("all checks passed")

# %% [markdown]
# **Next:** [09_training.ipynb](09_training.ipynb), Training: the bias update, the MTP objective and FP8,
# measured on a small model trained in a minute.
