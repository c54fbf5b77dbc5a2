"""Tensor-parallel building blocks on torch.distributed: how one linear layer is split over ranks.

A linear layer y = x W^T with W of shape (out, in) splits two ways (Megatron-LM's names):

- **column-parallel**: each rank keeps a block of W's rows (output features). It computes its
  block of y from the whole x; nothing is exchanged. A column-parallel layer *is* a smaller linear
  layer, so the model's own `nn.Linear` / `FP8Linear` is kept, with its rows cut (`narrow_rows`).
- **row-parallel**: each rank keeps a block of W's columns (input features) and takes the matching
  block of x, which is exactly what a column-parallel layer before it produced. Each rank's product
  is a partial sum of y; an all-reduce adds them up (`sum_output`, a forward hook).

So an FFN down(silu(gate(x)) * up(x)) splits as gate, up column-parallel and down row-parallel:
one all-reduce per FFN, and attention the same way by heads (q/kv expansion column-parallel,
o_proj row-parallel). The embedding and the LM head split the vocabulary (`VocabParallelEmbedding`,
`gather_vocab`). The collectives are dsv3ref.parallel.comm's, so gradients flow through them: the
replicated input of split work is marked with `replicated_input_hook` (its gradient is summed over
the ranks backward).

Splits follow `split_range`: whole units (a head's rows, a 128-block of an FP8 weight, one column)
as evenly as possible over the ranks. Everything here takes its process group as an argument;
nothing is global.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3ref.checkpoint import Shard
from dsv3ref.fp8 import BLOCK, FP8Linear
from dsv3ref.parallel.comm import gather_parts, replicated_input, sum_partials


class ParallelError(ValueError):
    """A model, checkpoint or world size that cannot be split as asked: the message names the tensor,
    its shape and the world size."""


def split_range(total: int, world: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """Rank `rank`'s part [start, stop) of `total` items cut in whole `unit`s over `world` ranks, as
    evenly as possible (the first ranks take one unit more when the units do not divide evenly; a rank
    can get none when there are fewer units than ranks)."""
    units = math.ceil(total / unit)
    per_rank, extra = divmod(units, world)
    first = rank * per_rank + min(rank, extra)
    count = per_rank + (1 if rank < extra else 0)
    return min(first * unit, total), min((first + count) * unit, total)


def even_split(total: int, world: int, rank: int, what: str) -> tuple[int, int]:
    """[start, stop) of rank's equal share of `total` (heads, experts, vocabulary): an error naming
    `what` when world does not divide it."""
    if total % world:
        raise ParallelError(f"{what}={total} cannot be split evenly over world size {world}: choose a world size "
                            f"that divides it")
    share = total // world
    return rank * share, (rank + 1) * share


def narrow_rows(layer: nn.Module, start: int, stop: int, name: str, world: int) -> dict[str, Shard]:
    """Cut `layer` (nn.Linear or FP8Linear) down to output rows [start, stop): column-parallel."""
    return _narrow(layer, 0, start, stop, name, world)


def narrow_columns(layer: nn.Module, start: int, stop: int, name: str, world: int) -> dict[str, Shard]:
    """Cut `layer` down to input columns [start, stop): the weight of a row-parallel layer."""
    return _narrow(layer, 1, start, stop, name, world)


def _narrow(layer: nn.Module, dim: int, start: int, stop: int, name: str, world: int) -> dict[str, Shard]:
    """Keep indices [start, stop) of the layer's weight (and a column-parallel layer's bias) along
    dim; returns {tensor name: Shard} for the loader."""
    weight = layer.weight
    shard = Shard(dim, start, stop)
    shards = {f"{name}.weight": shard}
    if isinstance(layer, FP8Linear):
        if start % BLOCK or (stop % BLOCK and stop != weight.shape[dim]):
            raise ParallelError(f"{name}.weight of shape {tuple(weight.shape)}: world size {world} splits it at "
                                f"[{start}, {stop}) along dim {dim}, inside a {BLOCK}x{BLOCK} block of its FP8 "
                                f"scales; choose a world size whose split falls on the {BLOCK}-block grid (or "
                                "gemm_impl='bf16', which dequantizes on load)")
        layer.weight_scale_inv = layer.weight_scale_inv.detach()[shard.blocks().index(2)].clone()
        layer.weight = weight.detach()[shard.index(2)].clone()  # (its cached dequantized forms are keyed by tensor)
    else:
        layer.weight = nn.Parameter(weight.detach()[shard.index(2)].clone(), requires_grad=weight.requires_grad)
    bias = getattr(layer, "bias", None)
    if bias is not None:
        if dim == 1:  # each rank would add it to its partial sum: world times in the all-reduce
            raise ParallelError(f"{name}.bias: a row-parallel layer with a bias is not supported (world size "
                                f"{world}); DeepSeek-V3's split layers have none")
        layer.bias = nn.Parameter(bias.detach()[start:stop].clone(), requires_grad=bias.requires_grad)
        shards[f"{name}.bias"] = Shard(0, start, stop)
    if dim == 0:
        layer.out_features = stop - start
    else:
        layer.in_features = stop - start
    return shards


def sum_output(group: dist.ProcessGroup):
    """A forward hook for a row-parallel layer: its partial outputs summed over the group (g)."""
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return sum_partials(output, group)
    return hook


def replicated_input_hook(group: dist.ProcessGroup):
    """A forward pre-hook for a column-parallel layer (or a block of split work): its replicated
    input marked so that backward sums the ranks' gradients (f)."""
    def hook(module: nn.Module, args):
        return (replicated_input(args[0], group), *args[1:])
    return hook


def replicated_output_hook(group: dist.ProcessGroup, start: int = 0):
    """A forward hook on a replicated layer whose output (from column `start` on) feeds split work:
    that part marked as `replicated_input_hook` marks an input. Only when gradients are taken."""
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return output
        if start == 0:
            return replicated_input(output, group)
        return torch.cat([output[..., :start], replicated_input(output[..., start:], group)], dim=-1)
    return hook


def gather_vocab(group: dist.ProcessGroup):
    """A forward hook for a vocabulary-split LM head: each rank's logits (..., vocab / world) are
    gathered into the full (..., vocab), rank 0's block first."""
    def hook(module: nn.Module, args, logits: torch.Tensor) -> torch.Tensor:
        return gather_parts(logits, -1, group)
    return hook


class VocabParallelEmbedding(nn.Embedding):
    """An embedding whose rows [start, stop) of the vocabulary live on this rank.

    Each rank looks up the ids it holds and writes zeros for the others; an all-reduce over the
    group adds the ranks' rows, so every rank ends with every token's embedding. Parameter name
    `weight`, as the embedding it replaces (its rows [start, stop) of the checkpoint tensor).
    """

    def __init__(self, weight: torch.Tensor, start: int, group: dist.ProcessGroup):
        super().__init__(weight.shape[0], weight.shape[1], _weight=weight, _freeze=not weight.requires_grad,
                         device=weight.device, dtype=weight.dtype)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (b, t) -> (b, t, dim), complete on every rank."""
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)  # (b, t): rows another rank holds
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        return sum_partials(out, self.group)
