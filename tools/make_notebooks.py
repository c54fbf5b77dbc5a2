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
    ("code", """from transformers import DeepseekV3ForCausalLM

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
