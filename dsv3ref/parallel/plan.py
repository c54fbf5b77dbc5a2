"""The parallel plan: which tensor of DeepSeek-V3 is split how, applied to the model from outside.

`parallelize(model, group, Parallel(layout, moe_comm))` cuts a single-process `DeepseekV3` down to
one rank's part, in place, and adds the communication. The model's code is not changed: its modules
keep their classes and names (so a checkpoint loads by name); the plan narrows their weights and
hooks the collectives in. World size 1 leaves the model exactly as it is.

layout "tp" (DeepSeek's inference code, `inference/model.py`):

| tensor                                            | split                     | communication               |
|---------------------------------------------------|---------------------------|-----------------------------|
| `embed_tokens`                                    | vocabulary rows           | all-reduce                  |
| `q_proj` / `q_b_proj`, `kv_b_proj`                | rows, by heads            | none                        |
| `o_proj`                                          | columns, by heads         | all-reduce                  |
| `q_a_proj`, `kv_a_proj_with_mqa`, norms, router   | replicated                | none                        |
| dense MLP: `gate_proj`, `up_proj`                 | rows (128-blocks for FP8) | none                        |
| dense MLP: `down_proj`                            | columns                   | all-reduce                  |
| shared expert: `gate_proj`, `up_proj`, `down_proj`| as the dense MLP          | summed with the routed ones |
| routed experts                                    | whole experts, E / world  | `moe_comm`                  |
| `lm_head`                                         | vocabulary rows           | all-gather of logits        |

An MoE layer makes one exchange: with "allreduce", one all-reduce of the routed and shared experts'
partial sums together; with "alltoall", the shared expert's partial sums are reduce-scattered onto
the slices of tokens each rank dispatches, and one all-gather joins the slices' outputs.

The collectives are `dsv3ref.parallel.comm`'s: torch's functional collectives with their autograd
rules, so gradients through a split model are one process's. Where a replicated tensor enters a
split region (the inputs of `q_b_proj` / `q_proj` and of the dense MLP, the latent after
`kv_a_layernorm`, the rotary key), a hook marks it: the identity forward, an all-reduce of the
gradient backward (each rank's part of the gradient is a partial sum).

layout "dp" (data-parallel attention): every rank holds all of it but the routed experts, and
serves its own batch rows with its own cache; the routed experts are split as above and exchanged
by `moe_comm` (see dsv3ref.parallel.moe).

Heads, experts and the vocabulary must divide by the world size. An FFN's width is split in whole
128-blocks when its weights are FP8 (as evenly as possible: at 32 ranks DeepSeek-V3's 18432-wide
dense FFN gives 16 ranks 5 blocks and 16 ranks 4; its 2048-wide shared expert gives 16 ranks one
block and 16 none), in single columns otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsv3ref.checkpoint import Headers, Shard, load_pretrained
from dsv3ref.fp8 import BLOCK, FP8Linear
from dsv3ref.impl import AUTO, check_choice
from dsv3ref.mla import MLA
from dsv3ref.mlp import MLP
from dsv3ref.model import DeepseekV3
from dsv3ref.moe import MoE
from dsv3ref.parallel.layers import (
    VocabParallelEmbedding,
    even_split,
    gather_vocab,
    narrow_columns,
    narrow_rows,
    replicated_input_hook,
    replicated_output_hook,
    split_range,
    sum_output,
)
from dsv3ref.parallel.moe import ParallelMoE


@dataclass(frozen=True)
class Parallel:
    """How a model is spread over the ranks of a process group (values: dsv3ref.impl.CHOICES)."""

    layout: str = "tp"
    """"tp": tensor-parallel attention and dense FFNs (heads and widths split); "dp": data-parallel
    attention (each rank its own batch rows, attention and dense FFNs replicated)."""
    moe_comm: str = "allreduce"
    """How tokens meet the routed experts: "allreduce" or "alltoall" (see dsv3ref.parallel.moe)."""

    def __post_init__(self) -> None:
        check_choice("layout", self.layout)
        check_choice("moe_comm", self.moe_comm)


@dataclass
class ParallelState:
    """What `parallelize` did to a model, kept as `model.parallel`."""

    group: dist.ProcessGroup
    rank: int
    world_size: int
    parallel: Parallel
    shards: dict[str, Shard]
    """Every tensor that was split: its part on this rank (read so by the sharded loader)."""


def parallelize(model: DeepseekV3, group: dist.ProcessGroup | None = None, parallel: Parallel = Parallel()
                ) -> dict[str, Shard]:
    """Cut `model` (in place) down to this rank's part of `group` (default: the whole world) under
    `parallel`, and hook in the communication; returns the Shard of every split tensor.

    Works on a model with weights (each rank keeps its slices) and on one built on the meta device
    (what the sharded loader does). World size 1: the model is left unchanged.
    """
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cfg = model.config
    shards: dict[str, Shard] = {}
    model.parallel = ParallelState(group, rank, world, parallel, shards)
    if world == 1:
        return shards
    tp = parallel.layout == "tp"
    first, stop = even_split(cfg.n_routed_experts, world, rank, "n_routed_experts")
    if tp:
        start, end = even_split(cfg.vocab_size, world, rank, "vocab_size")
        embed = model.model.embed_tokens
        model.model.embed_tokens = VocabParallelEmbedding(
            embed.weight.detach()[start:end].clone().requires_grad_(embed.weight.requires_grad), start, group)
        shards["model.embed_tokens.weight"] = Shard(0, start, end)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            shards.update(narrow_rows(model.lm_head, start, end, "lm_head", world))
        model.lm_head.register_forward_pre_hook(replicated_input_hook(group))
        model.lm_head.register_forward_hook(gather_vocab(group))
    for name, module in list(model.named_modules()):
        if tp and isinstance(module, MLA):
            shards.update(_split_attention(module, name, cfg.num_attention_heads, rank, world, group))
        elif tp and isinstance(module, MLP) and name.endswith(".mlp"):  # a dense layer's FFN
            shards.update(_split_ffn(module, name, rank, world))
            module.register_forward_pre_hook(replicated_input_hook(group))
            module.down_proj.register_forward_hook(sum_output(group))
        elif isinstance(module, MoE):
            if tp and module.shared_experts is not None:  # ParallelMoE adds its partial sums to the experts'
                shards.update(_split_ffn(module.shared_experts, f"{name}.shared_experts", rank, world))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ParallelMoE(module, group, parallel.layout,
                                                                    parallel.moe_comm, first, stop))
    return shards


def _split_attention(attn: MLA, name: str, heads: int, rank: int, world: int, group) -> dict[str, Shard]:
    """Heads [h0, h1) on this rank: their query and key/value expansion rows, their o_proj columns.

    The latent c^KV and the rotary key k^R are computed whole on every rank (they are shared by all
    heads), as is the query latent; where they enter this rank's heads they are marked replicated,
    so that backward adds the heads' gradients of all ranks before they reach the shared weights."""
    h0, h1 = even_split(heads, world, rank, "num_attention_heads")
    attn.n_heads = h1 - h0
    qk, kv = attn.qk_nope_head_dim + attn.qk_rope_head_dim, attn.qk_nope_head_dim + attn.v_head_dim
    shards = {}
    q = "q_proj" if hasattr(attn, "q_proj") else "q_b_proj"
    shards.update(narrow_rows(getattr(attn, q), h0 * qk, h1 * qk, f"{name}.{q}", world))
    shards.update(narrow_rows(attn.kv_b_proj, h0 * kv, h1 * kv, f"{name}.kv_b_proj", world))
    shards.update(narrow_columns(attn.o_proj, h0 * attn.v_head_dim, h1 * attn.v_head_dim, f"{name}.o_proj", world))
    getattr(attn, q).register_forward_pre_hook(replicated_input_hook(group))
    attn.kv_a_layernorm.register_forward_hook(replicated_output_hook(group))  # c^KV
    attn.kv_a_proj_with_mqa.register_forward_hook(replicated_output_hook(group, attn.kv_lora_rank))  # k^R
    attn.o_proj.register_forward_hook(sum_output(group))
    return shards


def _split_ffn(mlp: MLP, name: str, rank: int, world: int) -> dict[str, Shard]:
    """A dense FFN or the shared experts: its intermediate width split (whole 128-blocks for FP8)."""
    width = mlp.gate_proj.out_features
    unit = BLOCK if isinstance(mlp.gate_proj, FP8Linear) else 1
    start, stop = split_range(width, world, rank, unit)
    shards = {}
    for proj in ("gate_proj", "up_proj"):
        shards.update(narrow_rows(getattr(mlp, proj), start, stop, f"{name}.{proj}", world))
    shards.update(narrow_columns(mlp.down_proj, start, stop, f"{name}.down_proj", world))
    return shards


def from_pretrained(path: str | Path | Headers, group: dist.ProcessGroup | None = None,
                    parallel: Parallel = Parallel(), *, dtype: torch.dtype | str = AUTO,
                    device: str | torch.device = "cpu", attn_impl: str = "absorb", moe_impl: str = AUTO,
                    gemm_impl: str = AUTO, fp8_kernel: str = AUTO, attn_order: str = "auto", mtp: bool | None = None,
                    check_finite: bool = True, progress: bool | None = None) -> DeepseekV3:
    """`DeepseekV3.from_pretrained` for one rank of `group`: the model is built on the meta device,
    cut to this rank's part by `parallelize`, and only that part of each tensor is read from the
    Hugging Face-format shards (`safe_open(...).get_slice`; FP8 block scales on the same grid). No
    conversion step and no other rank's part is ever materialized.

    The defaults are the launch's: the checkpoint's own format (FP8 weights stay FP8), torch's
    blockwise scaled_mm where the device runs it, bfloat16 on CUDA (float32 on a CPU), absorbed
    attention; "auto" is decided by dsv3ref.checkpoint.resolve_implementation. progress: a tqdm bar
    on rank 0 (None: when the rank reads more than 1 GiB). A `Headers` source allocates this rank's
    part and reads nothing (what dsv3ref.parallel.simulate runs). The other keywords are
    from_pretrained's."""
    group = group or dist.group.WORLD
    if dist.get_rank(group) != 0:
        progress = False
    return load_pretrained(DeepseekV3, path, dtype=dtype, device=device, attn_impl=attn_impl, attn_order=attn_order,
                           moe_impl=moe_impl, gemm_impl=gemm_impl, fp8_kernel=fp8_kernel, mtp=mtp,
                           check_finite_values=check_finite, progress=progress,
                           parallelize=lambda model: parallelize(model, group, parallel))


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers on this rank (router bias included)."""
    persistent = model.state_dict().keys()
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if n in persistent})
    return sum(t.numel() * t.element_size() for t in tensors.values())
