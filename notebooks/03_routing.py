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
# # 03 · DeepSeekMoE routing: sigmoid scores, groups, and a bias that balances without a loss
#
# *Lesson 3 of the dsv3ref course (lessons 00 to 11), after [02_mla](02_mla.ipynb) (Multi-head Latent
# Attention).*
#
# **What this notebook teaches.** How a DeepSeek-V3 router picks 8 of 256 experts for a token:
# sigmoid affinities, group-limited selection (a token may only use experts from its best
# `topk_group` of `n_group` groups), the auxiliary-loss-free balancing bias that changes *which*
# experts are chosen but not *how much* they weigh, the load that results over a batch, and one
# bias-update step moving load from hot experts to cold ones. Finally the grouped-GEMM expert path,
# checked against the plain per-expert loop.
#
# Report sections: DeepSeek-V3 §2.1.2 (eqs. 12-16 routing, the bias update; eqs. 17-20 the
# sequence-wise balance loss).

# %%
import matplotlib.pyplot as plt
import torch

from dsv3ref import DeepseekV3, ModelConfig, routing
from dsv3ref.router import select_experts

_ = torch.manual_seed(0)
torch.set_grad_enabled(False)  # inference only in this notebook
# DeepSeek-V3's routing shape, scaled down: 32 experts in 8 groups, a token uses 4 groups and 8 experts
cfg = ModelConfig.preset("tiny").replace(n_routed_experts=32, n_group=8, topk_group=4, num_experts_per_tok=8,
                                         num_hidden_layers=4, first_k_dense_replace=1, num_nextn_predict_layers=0)
model = DeepseekV3(cfg, moe_impl="grouped").eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" not in name:
            p.normal_(0, 1.0 if "embed" in name else p.shape[-1] ** -0.5)
router = model.model.layers[1].mlp.gate
print(router.weight.shape, "router weight (experts, hidden);", router.e_score_correction_bias.shape, "bias")

# %% [markdown]
# ## 1. One token, step by step
#
# Affinities $s_{i,t} = \sigma(u_t^\top e_i)$ (eq. 15). For the choice only, the bias is added:
# $s_{i,t} + b_i$. Each group is ranked by the sum of its two best biased scores; the best
# `topk_group` groups stay; the top-8 experts among them are chosen (eq. 16).

# %%
with torch.no_grad():
    router.e_score_correction_bias.copy_(0.15 * torch.randn(cfg.n_routed_experts))
u = torch.randn(1, cfg.hidden_size)
s = router.scores(u)[0]                                  # (experts,)
bias_used = router.e_score_correction_bias.clone()
biased = s + bias_used
per = cfg.n_routed_experts // cfg.n_group
group_score = biased.reshape(cfg.n_group, per).topk(2, dim=-1).values.sum(-1)
ids, groups = select_experts(s[None], router.e_score_correction_bias, top_k=cfg.num_experts_per_tok,
                             n_group=cfg.n_group, topk_group=cfg.topk_group, return_groups=True)
ids, groups = ids[0], groups[0]
print("group scores:", [round(v, 2) for v in group_score.tolist()])
print("eligible groups:", sorted(groups.tolist()), " chosen experts:", sorted(ids.tolist()))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3), gridspec_kw={"width_ratios": [1, 3]})
ax1.bar(range(cfg.n_group), group_score, color=["C2" if g in groups else "lightgray" for g in range(cfg.n_group)])
ax1.set_xlabel("group")
ax1.set_title("group score = sum of its 2 best")
colors = ["C3" if e in ids else ("C0" if e // per in groups else "lightgray") for e in range(cfg.n_routed_experts)]
ax2.bar(range(cfg.n_routed_experts), biased, color=colors)
for g in range(1, cfg.n_group):
    ax2.axvline(g * per - 0.5, color="k", lw=0.5)
ax2.set_xlabel("expert (red: chosen; blue: eligible; gray: group not kept)")
ax2.set_title("biased affinity s + b")
fig.tight_layout()

# %% [markdown]
# Why groups at all: group-limited routing is how the release implements the report's *node-limited*
# routing, a device of **training** (section 2.1.2; section 3.2.2 on the all-to-all). In training the
# experts were spread with 64-way expert parallelism over 8 nodes, and a token was sent to at most
# M = 4 nodes: its hidden state crosses InfiniBand once per target node and is then forwarded to the
# GPUs within the node over NVLink, so bounding the nodes bounds the slow traffic. The 256 experts are
# split into 8 groups (one per node of that layout), a token takes its 8 experts from at most 4 groups,
# and a group is ranked by the sum of its K_r / M = 8 / 4 = 2 best (biased) scores: the report's rule
# for choosing nodes. Inference (section 3.4) deploys the experts differently, but the released router
# keeps the rule. With this bound and the balancing below, DeepSeek-V3 drops **no tokens**, in
# training or inference (section 2.1.2, "No Token-Dropping").

# %% [markdown]
# ## 2. The bias decides the choice, not the weight
#
# Why the bias stays out of the gate value: the bias exists to balance the load *without* an
# auxiliary loss, because a loss large enough to balance the experts pulls the gradients away from
# the language-modelling objective and impairs the model (section 2.1.2, citing Wang et al., 2024a).
# The bias gets no gradient; it is set by the update rule of section 4 below, and since it only
# changes which experts are chosen, the function the model computes for a given choice is untouched.
#
# The gate values are the *unbiased* scores of the chosen experts, normalized to sum to one and
# multiplied by `routed_scaling_factor` (the normalization is eq. 13; the factor, 2.5 in the
# released config, appears in no equation of the report: it is a constant of the release, scaling
# the routed experts' sum against the shared expert's output). Shifting the bias changes the chosen set; for an
# expert chosen in both cases, its gate value is computed from the same $s_{i,t}$.

# %%
with torch.no_grad():
    weights_b, ids_b = router(u)
    saved = router.e_score_correction_bias.clone()
    router.e_score_correction_bias.zero_()
    weights_0, ids_0 = router(u)
    router.e_score_correction_bias.copy_(saved)
print("with bias   :", sorted(ids_b[0].tolist()))
print("without bias:", sorted(ids_0[0].tolist()))
unbiased_share = s[ids_b[0]] / s[ids_b[0]].sum() * cfg.routed_scaling_factor
print("gate values with bias  :", [round(w, 3) for w in weights_b[0].tolist()])
print("from unbiased scores   :", [round(w, 3) for w in unbiased_share.tolist()])
print("sum of gate values:", round(weights_b.sum().item(), 4), "= routed_scaling_factor", cfg.routed_scaling_factor)

# %% [markdown]
# ## 3. Expert load over a batch
#
# `routing.capture(model)` records every router decision made inside it (per layer, per forward
# pass): the scores, the eligible groups, the chosen experts, their gate values and the load.

# %%
ids_batch = torch.randint(0, cfg.vocab_size, (8, 64))
with torch.no_grad():
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    with routing.capture(model) as records:
        model(ids_batch)
load = torch.stack([records[i][0].counts for i in sorted(records)]).float()   # (moe layers, experts)
fig, ax = plt.subplots(figsize=(10, 2.4))
im = ax.imshow(load, aspect="auto", cmap="viridis")
ax.set_yticks(range(len(records)), [f"layer {i}" for i in sorted(records)])
ax.set_xlabel("expert")
ax.set_ylabel("MoE layer")
ax.set_title(f"tokens per expert, {ids_batch.numel()} tokens x {cfg.num_experts_per_tok} experts each")
fig.colorbar(im, ax=ax)
fig.tight_layout()
print("max / mean load per layer:", [round(v, 2) for v in (load.max(1).values / load.mean(1)).tolist()])

# %% [markdown]
# ## 4. One bias-update step
#
# After a step, $b_i \leftarrow b_i + \gamma\, \mathrm{sign}(\overline{load} - load_i)$: overloaded
# experts become less attractive, idle ones more. The report uses $\gamma = 0.001$ for the first
# 14.3T training tokens and $\gamma = 0$ for the last 500B (section 4.2: the bias is frozen at the
# end); to see the effect of a single step here we take $\gamma = 0.02$.

# %%
layer1 = model.model.layers[1].mlp.gate
before = load[0].clone()
routing.update_bias(layer1.e_score_correction_bias, before, gamma=0.02)
with torch.no_grad(), routing.capture(model) as records_after:
    model(ids_batch)
after = records_after[1][0].counts.float()
hot = before > before.mean()
fig, ax = plt.subplots(figsize=(10, 2.6))
x = torch.arange(cfg.n_routed_experts)
ax.bar(x - 0.2, before, width=0.4, label="before")
ax.bar(x + 0.2, after, width=0.4, label="after one update")
ax.axhline(before.mean(), color="k", lw=0.8, ls="--", label="mean load")
ax.set_xlabel("expert (layer 1)")
ax.set_ylabel("tokens routed to it")
ax.legend(fontsize=8)
fig.tight_layout()
spread = {name: (c.std() / c.mean()).item() for name, c in (("before", before), ("after", after))}
print(f"load on experts that were hot: {before[hot].sum():.0f} -> {after[hot].sum():.0f}; "
      f"max/mean {before.max() / before.mean():.2f} -> {after.max() / after.mean():.2f}; "
      f"std/mean {spread['before']:.3f} -> {spread['after']:.3f}")

# %% [markdown]
# The complementary sequence-wise loss (eqs. 17-20) is `routing.sequence_balance_loss(scores,
# ids)`: $\alpha \sum_i f_i P_i$, which equals $\alpha$ exactly when routing is perfectly balanced and the
# scores are uniform. The report uses a tiny $\alpha = 0.0001$: the bias does the balancing, this
# loss only guards against extreme imbalance within one sequence. Below, $\alpha = 1$ so that the
# printed value reads directly against its balanced value of 1.

# %%
scores = torch.stack([r.scores for r in records[1]]).reshape(8, 64, -1)
chosen = torch.stack([r.ids for r in records[1]]).reshape(8, 64, -1)
print("sequence balance loss / alpha:", round((routing.sequence_balance_loss(scores, chosen, alpha=1.0)).item(), 3))

# %% [markdown]
# ## 5. Grouped experts
#
# `moe_impl="grouped"` sorts the (token, expert) assignments by expert and runs every expert's
# projection in one grouped GEMM; `moe_impl="loop"` visits the experts one by one. Same weights, same
# result.

# %%
loop_model = DeepseekV3(cfg, moe_impl="loop").eval()
loop_model.load_state_dict(model.state_dict())
with torch.no_grad():
    a, b = loop_model(ids_batch), model(ids_batch)
grouped_error = ((a - b).abs().max() / a.abs().max()).item()
print(f"grouped vs loop, relative difference {grouped_error:.1e}")


# %% [markdown]
# ## Checks

# %%
def brute_force(scores, bias, k, n_group, topk_group):
    choice = (scores + bias).tolist()
    per_group = len(choice) // n_group
    group_rank = sorted(range(n_group), key=lambda g: (-sum(sorted(choice[g * per_group:(g + 1) * per_group])[-2:]), g))
    eligible = [e for g in group_rank[:topk_group] for e in range(g * per_group, (g + 1) * per_group)]
    return sorted(sorted(eligible, key=lambda e: (-choice[e], e))[:k])


assert sorted(ids.tolist()) == brute_force(s, bias_used, 8, 8, 4)
assert len({e // per for e in ids.tolist()}) <= cfg.topk_group              # experts from kept groups only
assert torch.allclose(weights_b[0], unbiased_share)                         # weights ignore the bias
assert abs(weights_b.sum().item() - cfg.routed_scaling_factor) < 1e-5
assert load.sum(1).eq(ids_batch.numel() * cfg.num_experts_per_tok).all()    # every assignment counted
assert after[hot].sum() < before[hot].sum()                                 # the update cools hot experts
assert spread["after"] < spread["before"]                                   # and evens out the load
assert grouped_error < 1e-5
print("all checks passed")

# %% [markdown]
# **Exercise:** [e03_routing.ipynb](exercises/e03_routing.ipynb): write the router's group-limited choice with the bias, and its weights yourself; `dsv3ref`
# checks it and says where it first differs.
#
# **Next:** [04_oracle.ipynb](04_oracle.ipynb), dsv3ref as your oracle: tracing, comparing with HF,
# finding bugs by their first divergence.
