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
# # 11 · Training across GPUs: pipeline stages, DualPipe, expert parallelism and ZeRO
#
# *Lesson 11 of the dsv3ref course (lessons 00 to 11), after [10_kernels](10_kernels.ipynb); it builds on
# [09_training](09_training.ipynb), which trained the model in one process.*
#
# **What this notebook teaches.** DeepSeek-V3 exists because of how it was trained across 2,048 GPUs:
# the layers cut into 16 pipeline stages run by DualPipe, the routed experts of every layer spread over
# 64 GPUs on 8 nodes, and the optimizer state sharded over the data-parallel replicas (ZeRO-1), with no
# tensor parallelism at all (report §3.2). Here: what that layout puts on each GPU and sends between
# them; the pipeline schedules drawn from torch's own action lists, with the idle time (the *bubble*)
# counted and compared with the report's Table 2; how DualPipe hides the experts' all-to-all behind
# computation; and the layout itself run in miniature, on 2 and 4 CPU processes, equal to one process.
#
# **What runs here, what is described.** Sections 2 and 4 run: the schedules are torch's
# (`torch.distributed.pipelining`, built on its fake process group), and the miniature trains with
# `torchrun ... -m dsv3ref train --pp --ep --dp --schedule` on gloo, in float64. Section 1 counts the
# full model's layout from its configuration (nothing of that size runs here), and section 3 describes
# what DeepSeek's GPU kernels do that a CPU miniature cannot.
#
# Report sections: §3.2 (the training framework: DualPipe, Table 2, cross-node all-to-all, ZeRO-1,
# memory savings), §2.1.2 (node-limited routing), §2.2 (MTP sharing the embedding and the head).

# %%
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
from safetensors.torch import load_file

from dsv3ref import ModelConfig
from dsv3ref.train.distributed.checkpoint import gather_weights
from dsv3ref.train.distributed.cost import footprint
from dsv3ref.train.distributed.timeline import Costs, action_lists, play, table2_bubble

# %% [markdown]
# ## 1. The report's layout, per GPU
#
# 2,048 H800 GPUs, 8 to a node: **PP16** (each pipeline rank holds about 61 / 16 = 4 decoder layers),
# **EP64** (each MoE layer's 256 routed experts spread 4 to a GPU over 64 GPUs, that is 8 nodes) and the
# rest data parallel: 2,048 / 16 = 128 replicas of each pipeline rank's dense weights, which read
# different tokens, and 2,048 / (16 x 64) = 2 replicas of each expert. Expert parallelism is *folded
# into* data parallelism: the 64 GPUs of an expert group read different tokens, as data-parallel ranks
# do, and exchange them with all-to-alls. No tensor parallelism: the report avoids it by keeping each
# GPU's share small enough (below) and by recomputing RMSNorm and the MLA up-projections in the backward
# pass instead of storing their outputs.
#
# `footprint` counts what the heaviest pipeline rank (the first: the embedding and the three dense
# layers) holds: BF16 weights and FP32 gradients of all of it, and its share of the optimizer's FP32
# master weights and BF16 AdamW moments, sharded over the replicas (ZeRO-1). Activations are not counted:
# they depend on the micro-batch and the schedule (section 2).

# %%
full = ModelConfig.preset("deepseek-v3")
report_layout = footprint(full, gpus=2048, pp=16, ep=64, nodes_per_token=4)
print(f"heaviest pipeline rank: {report_layout.dense_params / 1e9:.2f}B dense parameters + "
      f"{report_layout.expert_params / 1e9:.3f}B of routed experts")
for name, size in report_layout.bytes.items():
    print(f"  {name:32s} {size / 2**30:6.2f} GiB")
print(f"  {'total (before activations)':32s} {report_layout.total_bytes / 2**30:6.2f} GiB of an H800's 80 GiB")
without_zero = 2 * 4 * (report_layout.dense_params + report_layout.expert_params) / 2**30
sharded = (report_layout.bytes["master weights (FP32, ZeRO-1)"] + report_layout.bytes["AdamW moments (BF16, ZeRO-1)"])
print(f"the same optimizer state unsharded (no ZeRO-1): {without_zero:.1f} GiB instead of {sharded / 2**30:.2f}")

# %% [markdown]
# **Why node-limited routing.** Each token goes to 8 of 256 experts. Unrestricted, those can sit on 8
# different nodes, and the token crosses InfiniBand (50 GB/s per GPU in the report) 8 times; the report
# routes each token to experts on at most **M = 4 nodes** (choose the 4 nodes with the best experts,
# then the top 8 among their experts: the group-limited routing of lesson 03, a group being a node),
# sends it once per node over IB and forwards it inside the node over NVLink (160 GB/s, 3.2x IB). In FP8
# with its scales on the way out, BF16 on the way back, one token through one MoE layer moves:

# %%
unlimited = footprint(full, nodes_per_token=8)
tokens = 4096  # one 4K-token sequence per micro-batch on one GPU: an assumption, the report gives no micro-batch size
moe_layers = 4  # on a pipeline rank of ~4 layers, all MoE past the first rank
for name, f in (("node-limited (M = 4)", report_layout), ("unlimited (8 nodes)", unlimited)):
    ib = f.ib_bytes_per_token * tokens * moe_layers
    print(f"{name:22s} IB {f.ib_bytes_per_token / 1e3:5.1f} kB per token per layer; a micro-batch of {tokens} tokens "
          f"through {moe_layers} MoE layers: {ib / 1e9:.2f} GB, {ib / 50e9 * 1e3:.0f} ms at 50 GB/s (forward; the "
          "backward moves as much)")
print(f"NVLink, forwarding inside the nodes: {report_layout.nvlink_bytes_per_token / 1e3:.1f} kB per token per layer "
      f"at most (8 experts)")

# %% [markdown]
# Tens of milliseconds of IB traffic per micro-batch and layer group, against computation of the same
# order: the traffic cannot simply be waited for. DualPipe's answer is to *overlap* it (section 3).
#
# ## 2. Pipeline schedules, from torch's own action lists
#
# A pipeline schedule decides, on each rank, the order of its compute actions on micro-batches:
# **F** (the forward pass of one micro-batch through one stage), **B** (its backward), or B split into
# **I** (the input gradient, which the previous stage waits for) and **W** (the weight gradient, which
# nobody waits for and can fill gaps), and in DualPipeV **F&B**: the forward of one micro-batch and the
# backward of another, run together. torch builds these lists for every rank (`pipeline_order`);
# `action_lists` takes them from the schedule objects (on torch's fake process group: no processes),
# and `play` runs each rank's list as early as its dependencies allow, with costs F = 1, B = 2, W = 1
# (so I = B - W = F, the usual assumption) and F&B = 2.5 (overlap saves half a forward). Communication
# takes no time here.
#
# The four schedules, on 4 ranks with 8 micro-batches (DualPipeV and ZBV: 2 stages per rank in a V; a
# darker shade is a later micro-batch):

# %%
costs = Costs(F=1, B=2, W=1, FB=2.5)
colors = {"F": plt.cm.Blues, "B": plt.cm.Oranges, "I": plt.cm.Oranges, "W": plt.cm.Greens, "F&B": plt.cm.Purples}
names = {"1f1b": "1F1B", "zb1p": "ZB1P (zero bubble, 1 stage per rank)", "zbv": "ZBV (zero bubble, V)",
         "dualpipev": "DualPipeV"}
timelines = {}
fig, axes = plt.subplots(4, 1, figsize=(11, 8.5), sharex=True)
for ax, schedule in zip(axes, names, strict=True):
    order, stages = action_lists(schedule, 4, 8)
    t = timelines[schedule] = play(order, stages, costs)
    for s in t.slots:
        shade = colors[s.kind](0.35 + 0.6 * s.work[0][1] / 8)
        ax.broken_barh([(s.start, s.end - s.start)], (s.rank - 0.4, 0.8), facecolors=shade, edgecolor="white")
        ax.text((s.start + s.end) / 2, s.rank, s.kind if s.kind != "F&B" else "FB", ha="center", va="center",
                fontsize=6)
    ax.set_yticks(range(4), [f"rank {r}" for r in range(4)])
    ax.invert_yaxis()
    ax.set_title(f"{names[schedule]}: step {t.length:g}, bubble per rank {sorted(set(t.bubble.values()))}",
                 fontsize=9)
axes[-1].set_xlabel("time (F = 1, B = 2, W = 1, F&B = 2.5)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Every stage here costs the same, so the V schedules, with two stages per rank, do twice the work per
# rank: with one model cut into twice as many stages each of their stages would cost half. Compare the
# bubbles, not the lengths of the steps. Read the pictures from the left: every schedule first fills the pipeline with forwards (rank 3 waits),
# and at the end drains it (rank 0 waits): that waiting is the bubble. 1F1B alternates one forward and
# one backward once full. ZB1P splits each backward and postpones the W parts into the drain, so the
# ranks that would wait compute weight gradients instead. DualPipeV puts stages 0 and 7 on rank 0, 1 and
# 6 on rank 1, and so on (the V): micro-batches flow down the ranks and back up, and in the middle of
# the step every rank runs F&B pairs, a forward of one micro-batch beside a backward of another.
#
# **The bubbles against Table 2.** The report counts 1F1B: (PP-1)(F+B); ZB1P: (PP-1)(F+B-2W); DualPipe:
# (PP/2-1)(F&B+B-3W). DualPipeV is DualPipe cut in half (DeepSeek's DualPipe repository): its P ranks
# hold the 2P stages of *one* copy of the model, where DualPipe's 2P ranks hold two copies running in
# opposite directions, so its bubble is DualPipe's with PP = 2P, and it needs half the parameters.
# Counted on 4 and 8 ranks:

# %%
table2 = []
for pp in (4, 8):
    for schedule in ("1f1b", "zb1p", "zbv", "dualpipev"):
        t = play(*action_lists(schedule, pp, 2 * pp), costs)
        formula = table2_bubble(schedule, pp, costs) if schedule != "zbv" else None
        table2.append((pp, schedule, max(t.bubble.values()), formula, max(t.peak_activations.values()),
                     t.peak_activations[0]))
print(f"{'ranks':>5}  {'schedule':10s} {'bubble':>7} {'Table 2':>8}   peak activations (max, rank 0)")
for pp, schedule, measured, formula, peak, peak0 in table2:
    print(f"{pp:5d}  {schedule:10s} {measured:7g} {formula if formula is not None else '-':>8}   {peak}, {peak0}")

# %% [markdown]
# The counts taken from torch's lists equal Table 2 for 1F1B, ZB1P and DualPipeV (whose slowest rank
# has the formula's bubble; its first ranks wait less). ZBV, the zero-bubble V schedule, is not in
# Table 2: with these costs it matches ZB1P's bubble with two stages per rank.
#
# The last columns count activations held at once, in micro-batch x stage units: ZB1P holds PP, as
# Table 2 says; DualPipeV 2P + 1 of its half-size stages, which is Table 2's PP + 1 with PP = 2P. torch's
# 1F1B (its interleaved schedule with one stage per rank, the one that runs from this list) warms up
# with more forwards than the textbook's and holds 2P - 1 on rank 0 instead of PP: the same bubble,
# more memory.
#
# The formulas are counts for the report's setting, where the input-gradient part of a backward costs
# a forward (I = F) and W is no larger than F. 1F1B's holds for any costs; the zero-bubble counts are
# sensitive to them. With I = 3 > F = 2, for instance, ZB1P's count still holds on these lists, and
# DualPipeV's slowest rank waits less than its formula says:

# %%
other = Costs(F=2, B=4, W=1, FB=5)  # I = 3 > F = 2
for schedule in ("1f1b", "zb1p", "dualpipev"):
    t = play(*action_lists(schedule, 4, 8), other)
    print(f"{schedule:10s} F=2 B=4 W=1 F&B=5: bubble {max(t.bubble.values()):g}, "
          f"Table 2 gives {table2_bubble(schedule, 4, other):g}")

# %% [markdown]
# ## 3. What the overlap buys, and what this miniature cannot show
#
# In an F&B slot of the DualPipeV timeline, rank r runs the forward of micro-batch m on one stage and
# the backward of micro-batch m' on the other. Each of them, per MoE layer, has an all-to-all to
# dispatch tokens to their experts and one to combine the results. DualPipe splits both chunks into
# attention, dispatch, MLP and combine, and orders the two chunks' pieces so that while one chunk's
# tokens travel over IB and NVLink, the other chunk computes: the F&B cost is then the computation of
# both, and the communication is hidden. In the timeline above, F&B = 2.5 < F + B = 3 is that saving.
#
# On DeepSeek's H800s this needs hardware-level care the report describes (§3.2.2): only 20 of the 132
# SMs run communication, with warp specialization (separate warps forward IB traffic to NVLink, and
# receive and accumulate), and custom PTX that keeps the communication kernels from polluting the L2
# cache. The miniature below runs torch's DualPipeV on CPU processes over gloo: its OVERLAP_F_B actions
# compute the forward and then the backward, and each all-to-all blocks, so nothing overlaps here. What
# it does show, exactly, is that the schedule and the layout compute the *same training step*.
#
# ## 4. The layout in miniature: 2 and 4 processes, equal to one
#
# The training loop's small model (4 layers, 16 experts, one MTP module), 3 steps of a batch of 16
# sequences of 32 bytes, in float64, first in one process (`python -m dsv3ref train`), then under
# `torchrun` with four layouts. In each, `dsv3ref.train.distributed` cuts the model into stages for
# torch's schedule (the embedding on the first stage, the head and the MTP module on the last, which
# the V puts on rank 0 too, so that the MTP module shares the embedding as the report arranges it),
# sends tokens to the ranks of their experts with autograd-aware all-to-alls, sums gradients over the
# ranks that hold the same weights, clips by the global norm, steps AdamW with its state sharded over
# the replicas (ZeRO-1, torch's ZeroRedundancyOptimizer) and updates the router bias from the load of
# the *global* batch, so that every rank's bias stays the same.

# %%
work = Path(tempfile.mkdtemp())
args = ["train", "--steps", "3", "--batch-size", "16", "--seq-len", "32", "--dtype", "float64", "--warmup", "1",
        "--microbatches", "4"]
env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def train_run(name, ranks=1, layout=()):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 else \
        [sys.executable]
    done = subprocess.run([*launcher, "-m", "dsv3ref", *args, *layout, "--out-dir", str(work / name)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]


single = train_run("single")
weights_one = load_file(work / "single" / "step_000003" / "model.safetensors")
layouts = {"pp 2, DualPipeV": (2, ["--pp", "2", "--schedule", "dualpipev"]),
           "ep 2": (2, ["--ep", "2"]),
           "pp 2 x ep 2, ZBV": (4, ["--pp", "2", "--ep", "2", "--schedule", "zbv"]),
           "pp 2 x dp 2, 1F1B": (4, ["--pp", "2", "--dp", "2", "--schedule", "1f1b"])}
differences = {}
for name, (ranks, layout) in layouts.items():
    metrics = train_run(name.replace(" ", "").replace(",", "_"), ranks, layout)
    loss = max(abs(a[k] - b[k]) for a, b in zip(metrics, single, strict=True) for k in ("loss", "mtp_loss", "grad_norm"))
    gathered = gather_weights(work / name.replace(" ", "").replace(",", "_") / "step_000003")
    weight = max(float((gathered[k] - weights_one[k]).abs().max()) for k in gathered)
    differences[name] = (loss, weight, len(gathered))
    # float64 rounding differs in the last digits from run to run of the same code: print the bound it meets
    print(f"{name:18s} {ranks} processes: losses and gradient norms within 1e-10 of one process: {loss < 1e-10}; "
          f"all {len(gathered)} tensors after 3 steps within 1e-10: {weight < 1e-10}")
print("one process, losses by step:", [round(r["loss"], 4) for r in single])

# %% [markdown]
# Every layout trains the same model as one process: the differences are float64 rounding (the sums are
# taken in another order), far below what a lost gradient or an unshared bias would cause (the tests
# break each of those on purpose and see a difference of 1e-3 or more). The router biases are among the
# gathered tensors: one value per expert on every rank, equal to the single process's.
#
# ## Checks

# %%
bubbles = {(pp, s): (measured, formula) for pp, s, measured, formula, _, _ in table2}
for pp in (4, 8):
    for schedule in ("1f1b", "zb1p", "dualpipev"):
        measured, formula = bubbles[(pp, schedule)]
        assert measured == formula, (pp, schedule, measured, formula)
peaks = {(pp, s): (peak, peak0) for pp, s, _, _, peak, peak0 in table2}
assert all(peaks[(pp, "zb1p")][0] == pp and peaks[(pp, "dualpipev")][0] == 2 * pp + 1 for pp in (4, 8))
assert max(play(*action_lists("dualpipev", 4, 8), other).bubble.values()) != table2_bubble("dualpipev", 4, other)
assert report_layout.total_bytes < 80 * 2**30 and unlimited.ib_bytes_per_token == 2 * report_layout.ib_bytes_per_token
for name, (loss, weight, count) in differences.items():
    assert loss < 1e-10 and weight < 1e-10 and count == len(weights_one) - 2, name  # less the MTP's copies
print("all checks passed")

# %% [markdown]
# **This is the last lesson.** The course's map is in [README.md](README.md), with the exercises beside
# the lessons; the package's, in `docs/architecture.md`. To run the layout yourself:
# `torchrun --nproc-per-node 4 -m dsv3ref train --pp 2 --ep 2 --schedule dualpipev` (on GPUs, add
# `--device cuda`).
