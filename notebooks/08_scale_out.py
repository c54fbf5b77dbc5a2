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
# *Lesson 8 of the dsv3ref course (lessons 00 to 11), after [07_text](07_text.ipynb) (text in, text out).*
#
# **What this notebook teaches.** The released DeepSeek-V3 is 641 GiB of FP8 weights: no GPU holds
# it. Here the same readable model is split over processes with `torch.distributed`: attention heads,
# FFN widths and the vocabulary cut across ranks (tensor parallelism), the 256 routed experts dealt out
# whole (expert parallelism), tokens brought to their experts by an all-reduce or an all-to-all.
# We draw which tensor is split how; run the split model in 2 and 4 CPU processes launched with
# torchrun, in float64 and from an FP8 checkpoint through the FP8 GEMM, and check its logits against
# one process; count the bytes each scheme moves per decode step, BF16 and with the report's FP8
# dispatch; ask the memory planner which machines hold the full model and check the plan by running
# the launch's code on fake tensors; read the report's own deployment (its prefilling and decoding
# units, redundant experts) in the same counts; and end with the commands that would launch the
# published checkpoint on 8x H200 and on two 8-GPU nodes.
#
# **What has run, and what has not.** Everything this notebook runs, runs here on CPUs: 2 and 4
# processes under torchrun with the gloo backend, on tiny and small models, in float64 and from this
# project's own FP8 checkpoints (random weights converted with `dsv3ref.convert`, the FP8 GEMM
# emulated exactly). The full model appears only as counts and as a launch simulated on fake tensors
# (shapes without data). Nothing in this lesson has run on a GPU, over NCCL, or on the published
# checkpoint: the commands at the end are the ones the code would launch, checked by that simulation;
# the GPU measurements still pending are listed in `docs/benchmarks.md` and scripted in
# `benchmarks/gpu_checks.sh`.
#
# **Units.** Device memory is in GiB (2^30 bytes), as GPUs report it: a card sold as "80 GB" (H100,
# H800) reports 79.6 GiB, one sold as "141 GB" (H200) 140.4 GiB. Bytes moved are in MiB (2^20).
#
# Report sections: DeepSeek-V3 §3.4 (inference and deployment: the prefilling and decoding units,
# redundant experts), §3.3 (FP8 dispatch, BF16 combine), §2.1.2 and §3.2 (node-limited routing).

# %%
import json
import os
import re
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
print(f"the release: {size:,} bytes ({size / 2**30:.1f} GiB), {elements:,} elements (the model card's '685B': 671B + "
      "the MTP module, whose "
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
# adds the others'). DeepSeek's own converter (`inference/convert.py`) cuts every split tensor into
# equal parts and asserts `param.size(dim) % mp == 0`, on the FP8 scales as on the weights: at 32 ranks
# the dense FFN's scales have 18432 / 128 = 144 rows, and 144 % 32 = 16, so its assertion fails there
# (and on the shared expert's 16 rows); up to 16 ranks every count divides.

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
# greedy-decodes, and rank 0 reports the largest difference and the bytes each rank read. Then the
# same from an FP8 checkpoint in the release's format, multiplied by the FP8 GEMM (`--gemm-impl fp8`:
# 1x128 activation tiles quantized to E4M3, 128x128 weight blocks, emulated exactly on the CPU).

# %%
tmp = Path(tempfile.mkdtemp())
cfg = ModelConfig.preset("tiny")
torch.manual_seed(0)
dsv3ref.save_pretrained(DeepseekV3(cfg), tmp / "tiny", max_shard_bytes=300_000)


def torchrun(n, ckpt, *args, must_pass=True):
    """Launch n processes of dsv3ref.parallel.selfcheck on ckpt; return rank 0's JSON report (or, when
    must_pass is False, the launch itself)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(29500 + n),
           "-m", "dsv3ref.parallel.selfcheck", str(ckpt), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    if not must_pass:
        return done
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(label, r):
    print(f"{label}: logits rel. error {r['logits_rel_err']:.1e}, same greedy tokens: {r['tokens_equal']}, "
          f"bytes read per rank {r['bytes_read_per_rank']} of {r['checkpoint_bytes']:,}")


runs = {}
for n, layout, comm in [(2, "tp", "allreduce"), (4, "tp", "allreduce"), (4, "dp", "alltoall")]:
    runs[n, layout, comm] = r = torchrun(n, tmp / "tiny", "--layout", layout, "--moe-comm", comm)
    show(f"float64, {n} ranks, {layout} + {comm:9}", r)

# %% [markdown]
# The split model computes what one process computes, to float64 rounding: splitting only regroups
# sums. Under "tp" each rank reads a bit more than 1/world of the file (the replicated tensors are read
# by all); under "dp" (data-parallel attention) each rank reads everything except other ranks' experts.
#
# **FP8 across processes.** An FP8 weight can be cut between ranks only on its 128x128 block grid:
# a rank holding half a block would need half a scale. The tiny model's 4 heads of 24 query rows do
# not fall on that grid, and the sharded loader says so before anything is computed. A model whose
# splits do (8 heads of 128 query rows, an FFN of three 128-blocks) runs: every rank's FP8 GEMM
# quantizes the same activation tiles as the whole model's, because row-parallel layers split the
# input channels at multiples of 128 too, so the split model equals one process to float64 rounding
# here as well.

# %%
from dsv3ref.convert import convert

convert(tmp / "tiny", tmp / "tiny-fp8", "bf16-to-fp8")
refused = torchrun(2, tmp / "tiny-fp8", "--gemm-impl", "fp8", must_pass=False)
reason = next(line for line in refused.stderr.splitlines() if "ParallelError:" in line)
reason = re.sub(r"\[\d+, \d+\)", "[...)", reason.split("ParallelError: ", 1)[1])  # either rank may say it first
print("tiny model in FP8 at 2 ranks, refused:", reason[:220], "...")
aligned = cfg.replace(hidden_size=128, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=64, kv_lora_rank=64,
                      qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, intermediate_size=384,
                      moe_intermediate_size=128)
torch.manual_seed(0)
dsv3ref.save_pretrained(DeepseekV3(aligned), tmp / "aligned", max_shard_bytes=300_000)
convert(tmp / "aligned", tmp / "aligned-fp8", "bf16-to-fp8")
for n, layout, comm in [(2, "tp", "allreduce"), (4, "dp", "alltoall")]:
    runs["fp8", n, layout, comm] = r = torchrun(n, tmp / "aligned-fp8", "--gemm-impl", "fp8", "--layout", layout,
                                                "--moe-comm", comm)
    show(f"FP8 GEMM, {n} ranks, {layout} + {comm:9}", r)

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
# per sequence.
#
# The report does one thing the code here does not: it **dispatches in FP8 and combines in BF16**
# (§3.3, low-precision communication). A token's hidden state is quantized to E4M3 in 1x128 tiles
# before the all-to-all (7168 bytes and 56 float32 scales, 7392 bytes, instead of 14,336 in BF16),
# because the experts' first GEMMs take FP8 inputs anyway; the combine, which carries the experts'
# weighted outputs back to be summed, stays BF16. The last line counts that variant: the same pairs,
# with each dispatched vector at its FP8 size (counted here, not built).

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


def sent_per_token_fp8_dispatch(world, batch=256):
    """dp + alltoall with the report's FP8 dispatch: each dispatched hidden state in E4M3 with one float32
    scale per 128 channels instead of BF16; ids, gates and the BF16 combine unchanged."""
    d, moe = full.hidden_size, sum(full.is_moe_layer(i) for i in range(full.num_hidden_layers))
    pairs = moe * (batch // world) * destinations(full, world)     # (token, GPU) pairs dispatched per step
    saved = pairs * (2 * d - (d + 4 * d // 128)) * (world - 1) / world
    return sent_per_token(world, "dp", "alltoall", batch) - saved / batch


MIB = 2**20
worlds = [8, 16, 32, 64]
schemes = [("tp", "allreduce"), ("tp", "alltoall"), ("dp", "allreduce"), ("dp", "alltoall")]
print("GPUs a token's hidden state reaches at most:", {w: destinations(full, w) for w in worlds})
for layout, comm in schemes:
    print(f"{layout} + {comm:9}             ",
          "  ".join(f"W={w}: {sent_per_token(w, layout, comm) / MIB:5.2f} MiB" for w in worlds))
print("dp + alltoall, FP8 dispatch", "  ".join(f"W={w}: {sent_per_token_fp8_dispatch(w) / MIB:5.2f} MiB" for w in worlds))
fig, ax = plt.subplots(figsize=(6, 3))
for layout, comm in schemes:
    ax.plot(worlds, [sent_per_token(w, layout, comm) / MIB for w in worlds], marker="o", label=f"{layout} + {comm}")
ax.plot(worlds, [sent_per_token_fp8_dispatch(w) / MIB for w in worlds], marker="o", ls="--",
        label="dp + alltoall, FP8 dispatch (counted)")
ax.set_xlabel("GPUs")
ax.set_ylabel("MiB sent per GPU per sequence")
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
# gathered again (the printed rows). Data-parallel attention with the all-to-all exchange sends each
# token only to the few GPUs holding its experts and only from its own GPU, the least of the four at
# every size, and once the group limit stops widening (8 destinations from 16 GPUs on) it falls as
# GPUs are added, where the others stay flat. Data-parallel attention with the all-reduce exchange
# sits between: attention moves nothing, but every GPU gathers every token. That, and the cache
# below, is why serving systems pair expert parallelism with DP attention. The FP8 dispatch takes
# about a quarter off the all-to-all (dispatch halves, combine stays); the overlap of communication
# with computation, the report's other tool, is not built here.

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
for gpu, sold in (("H100-80GB", "H100, sold as 80 GB"), ("H200-141GB", "H200, sold as 141 GB")):
    ax.axhline(GPU_MEMORY[gpu] / GIB, ls="--", color="gray")
    ax.text(60, GPU_MEMORY[gpu] / GIB + 2, f"{sold}: {GPU_MEMORY[gpu] / GIB:.1f} GiB", ha="right", fontsize=8)
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
# that could be alive together counted at once), a few percent above the peak the code reaches. At
# full size (8 GPUs, 32 prompts of 4096 tokens, and 16 GPUs with data-parallel attention) the same
# simulation takes about a minute a rank, too long for a lesson: tests/test_simulate.py runs it on
# every CI run and holds the plan's weights and cache equal to the simulated ones, its total within
# 10% of the simulated peak, and that peak plus the 3 GiB reserve below an H200's 140.4 GiB.

# %% [markdown]
# ## 5. The report's deployment: prefilling and decoding units, redundant experts
#
# DeepSeek serves the model with prefill and decode on separate machines (§3.4), each laid out for
# its own bottleneck. Both split attention by heads 4 ways (TP4, with sequence parallelism for the
# parts outside attention) and run many such groups side by side (data parallelism); both put the
# routed experts on many more GPUs than one node has:
#
# - **prefilling unit**: 4 nodes, 32 GPUs. Attention TP4 + SP with DP8; MoE EP32, each GPU holding 8
#   routed experts plus 1 redundant one (32 redundant experts in all); the shallow dense layers'
#   MLPs unsplit (1-way TP), to save their all-reduces. Tokens cross nodes over InfiniBand first,
#   then fan out over NVLink inside the node, as in training (node-limited routing: at most 4 nodes
#   per token).
# - **decoding unit**: 40 nodes, 320 GPUs. Attention TP4 + SP with DP80; MoE EP320, one routed
#   expert per GPU, 64 GPUs holding the redundant and the shared experts; dispatch and combine by
#   direct point-to-point transfers over InfiniBand.
#
# Counted from the configuration (FP8 weights with their float32 block scales), attention and the routed
# experts only (embedding, head, dense MLPs, shared expert, norms and router left out), what one GPU of
# each holds and what one token moves per MoE layer:

# %%
def fp8(out, inp):  # E4M3 bytes + one float32 scale per 128 x 128 block
    return out * inp + 4 * -(-out // 128) * -(-inp // 128)


d, heads, moe_layers = full.hidden_size, full.num_attention_heads, sum(
    full.is_moe_layer(i) for i in range(full.num_hidden_layers))
expert = 3 * fp8(full.moe_intermediate_size, d)                      # gate, up, down


def attention_tp(tp):  # one layer's attention with its heads split tp ways; the latent projections whole
    h = heads // tp
    return (fp8(full.q_lora_rank, d) + fp8(h * full.qk_head_dim, full.q_lora_rank)
            + fp8(full.kv_lora_rank + full.qk_rope_head_dim, d)
            + fp8(h * (full.qk_nope_head_dim + full.v_head_dim), full.kv_lora_rank) + fp8(d, h * full.v_head_dim))


units = {"prefill (32 GPUs)": dict(gpus=32, tp=4, experts_per_gpu=8 + 1),
         "decode (320 GPUs)": dict(gpus=320, tp=4, experts_per_gpu=1)}
dispatch_fp8, combine_bf16 = d + 4 * d // 128, 2 * d
for name, u in units.items():
    attn = full.num_hidden_layers * attention_tp(u["tp"])
    experts = moe_layers * u["experts_per_gpu"] * expert
    u["weights_gib"] = (attn + experts) / GIB
    print(f"{name}: {u['gpus'] // u['tp']} attention groups of TP{u['tp']} ({heads // u['tp']} heads a GPU); "
          f"{u['experts_per_gpu']} routed expert(s) a GPU; attention {attn / GIB:.1f} GiB + experts "
          f"{experts / GIB:.1f} GiB = {u['weights_gib']:.1f} GiB of FP8 weights a GPU")
print(f"per token and MoE layer, to each of at most {full.num_experts_per_tok} expert GPUs: dispatch "
      f"{dispatch_fp8:,} bytes (FP8 + scales), combine {combine_bf16:,} bytes (BF16); a token's whole step "
      f"moves at most {moe_layers * full.num_experts_per_tok * (dispatch_fp8 + combine_bf16) / MIB:.1f} MiB")

# %% [markdown]
# The decode unit's GPUs hold little (one expert per layer), so nearly all their memory goes to the
# latent cache of the sequences their attention group decodes, and every expert GEMM sees the tokens
# of 80 attention groups at once: large batches per expert are the point of EP320.
#
# **Redundant experts.** Routing is balanced on average over training, not at every moment of
# serving: some experts are hotter than others for the traffic of the hour. The report duplicates the
# hottest experts (from load statistics, re-chosen every ten minutes) and places the copies so that
# each GPU's load evens out. DeepSeek's open Expert-Parallelism Load Balancer (EPLB) does this
# hierarchically (groups of experts to nodes first, to respect the node limit, then copies within each
# node). Its idea in the flat form, on a made-up skewed load over the prefill unit's 256 experts and 32
# GPUs (the loads are synthetic: a log-normal draw, not measured traffic): give each of the 32 extra
# slots to the expert with the most load per copy, then deal the 288 copies out, heaviest first, each
# to the least-loaded GPU with a free slot.

# %%
g = torch.Generator().manual_seed(0)
load = torch.exp(0.8 * torch.randn(full.n_routed_experts, generator=g))  # tokens per expert, arbitrary units
gpus, slots = 32, 9
plain = load.view(gpus, -1).sum(1)                          # experts 8g .. 8g + 7 on GPU g, no copies
copies = torch.ones(full.n_routed_experts)
for _ in range(gpus * slots - full.n_routed_experts):       # each extra slot to the most loaded per copy
    copies[torch.argmax(load / copies)] += 1
pieces = sorted(((float(load[e] / copies[e]), e) for e in range(full.n_routed_experts) for _ in range(int(copies[e]))),
                reverse=True)
gpu_load, used = torch.zeros(gpus), torch.zeros(gpus, dtype=torch.long)
for share, _ in pieces:                                     # heaviest first, to the least-loaded GPU with room
    target = int(torch.argmin(torch.where(used < slots, gpu_load, torch.tensor(float("inf")))))
    gpu_load[target] += share
    used[target] += 1
imbalance = {"experts in order, no copies": float(plain.max() / plain.mean()),
             "32 redundant copies, packed": float(gpu_load.max() / gpu_load.mean())}
print({k: round(v, 3) for k, v in imbalance.items()}, "(busiest GPU / mean GPU; 1 is perfect)")
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.bar(range(gpus), plain.sort(descending=True).values, alpha=0.5, label="experts in order, no copies")
ax.bar(range(gpus), gpu_load.sort(descending=True).values, alpha=0.8, label="with 32 redundant copies")
ax.axhline(float(plain.mean()), color="gray", ls="--")
ax.set(xlabel="GPU (sorted by load)", ylabel="tokens routed (arbitrary units)", title="One MoE layer on 32 GPUs")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The step time of an expert-parallel layer is the busiest GPU's: with the experts in order, that GPU
# works the printed factor longer than the average one, and everyone waits for it. A few copies of
# the hottest experts, placed with care, bring the busiest GPU close to the mean. dsv3ref's own
# expert parallelism keeps one copy of each expert (E / world a rank); the redundant copies and the
# units above are taught as counts, not built.

# %% [markdown]
# ## 6. The commands
#
# On one node with 8 H200: the checkpoint's folder is all a launch needs. These commands are the
# ones the code launches and the simulation above checks at full size; this project has not yet run
# them on GPUs or on the published checkpoint (the GPU checks in `benchmarks/gpu_checks.sh` are
# pending in `docs/benchmarks.md`).
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
# `python -m dsv3ref plan` prints the table above; `--world-size 16 --gpu-memory-gib 79.6` one plan
# for a GPU reporting 79.6 GiB (a card sold as 80 GB), and `--simulate` beside it what the code
# allocates. What this lesson ran: the split model in 2 and 4 CPU processes (float64, and FP8 through
# the emulated FP8 GEMM), the counts, and a small simulated launch; what it only describes: the
# report's units and redundant experts, the FP8 dispatch, and every run on GPUs.

# %% [markdown]
# ## Checks

# %%
assert (size, elements) == (688_574_839_360, 684_531_386_000)
assert all(r["logits_rel_err"] < 1e-10 and r["tokens_equal"] for r in runs.values())  # float64 and FP8 GEMM
assert "inside a 128x128 block of its FP8 scales" in reason                            # the grid, said
assert runs[4, "tp", "allreduce"]["bytes_read_per_rank"][0] < runs[2, "tp", "allreduce"]["bytes_read_per_rank"][0]
assert sent_per_token(16, "dp", "alltoall") < sent_per_token(16, "tp", "allreduce")
assert destinations(full, 8) == 4 and destinations(full, 16) == 8
assert 0.70 < sent_per_token_fp8_dispatch(16) / sent_per_token(16, "dp", "alltoall") < 0.80  # dispatch halves only
assert dispatch_fp8 == 7392 and combine_bf16 == 14_336
assert imbalance["32 redundant copies, packed"] < imbalance["experts in order, no copies"]
fits = {(r["machine"], r["layout"]): r["fits"] for r in table}
assert fits["1x8 H200-141GB", "tp"] and fits["2x8 H100-80GB", "tp"] and not fits["1x8 H100-80GB", "tp"]
assert round(weight_bytes(full, 8) / GIB, 1) == 79.3 and round(weight_bytes(full, 16) / GIB, 1) == 40.2
for layout in sims:  # the simulated launch: weights and cache as counted, activations bounded from above
    s, p = sims[layout], plans[layout]
    assert s.weights == p.weights and s.cache == p.cache and 1 <= (p.used - p.reserve) / s.peak < 1.12
print("all checks passed")

# %% [markdown]
# **Next:** [09_training.ipynb](09_training.ipynb), Training: the bias update, the MTP objective and FP8,
# measured on a small model trained in a minute.
