"""Expert parallelism for training: each rank of an expert group holds n_experts / ep routed experts,
and tokens travel to them and back through autograd-aware all-to-alls.

The forward pass of one MoE layer on an expert group of `ep` ranks, each with its own tokens:

    1. route locally (the router is replicated), giving (token, slot) -> expert e, gate g;
    2. sort the assignments by expert; expert e lives on rank e // (n_experts / ep);
    3. all-to-all the counts, then the experts' ids, then the token rows (dispatch);
    4. each rank runs its experts on the rows it received, one expert at a time;
    5. all-to-all the results back (combine) and add g * result to each token's output.

Steps 3 and 5 use `torch.distributed._functional_collectives.all_to_all_single_autograd`, whose
backward is the reverse all-to-all: the gradients of the token rows go home the way they came, and
each expert's weight gradient sums the contributions of every rank's tokens. Sorted by expert and
added back in that order, each token's output is the same sum, in the same order, as the single
process's loop over experts (dsv3ref.moe.LoopExperts).

DeepSeek's own training sends tokens at most to 4 nodes (node-limited routing) with custom kernels
that overlap this traffic with computation (report section 3.2.2); here the collectives are gloo or
NCCL calls between computations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as fc

from dsv3ref.moe import LoopExperts, MoE


class ExpertParallelExperts(nn.Module):
    """This rank's share of a layer's routed experts, named `{e}` by their global index (the checkpoint's
    `experts.{e}.gate_proj.weight`), and the all-to-alls that bring them their tokens."""

    def __init__(self, experts: LoopExperts, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.n_experts = len(experts)
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.per_rank = self.n_experts // size
        self.first = rank * self.per_rank
        self.local = nn.ModuleDict({str(e): experts[e] for e in range(self.first, self.first + self.per_rank)})

    def _exchange(self, tensor: torch.Tensor, out_rows: list[int], in_rows: list[int]) -> torch.Tensor:
        """A plain (non-differentiable) all-to-all of rows."""
        out = tensor.new_empty((sum(out_rows), *tensor.shape[1:]))
        dist.all_to_all_single(out, tensor, out_rows, in_rows, group=self.group)
        return out

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """tokens (n, dim), weights (n, k), ids (n, k) -> (n, dim): sum over slots of g * expert(token)."""
        n, k = ids.shape
        flat = ids.reshape(-1)  # (n k,) expert of each assignment
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert, tokens in order within
        token_of = torch.arange(n, device=ids.device).repeat_interleave(k)[order]  # (n k,)
        expert_of = flat[order]
        size = dist.get_world_size(self.group)
        send = torch.bincount(expert_of // self.per_rank, minlength=size)  # rows to each rank
        recv = self._exchange(send, [1] * size, [1] * size)  # rows from each rank
        send_rows, recv_rows = send.tolist(), recv.tolist()
        got_experts = self._exchange(expert_of, recv_rows, send_rows)  # (m,) expert of each received row
        got = fc.all_to_all_single_autograd(tokens[token_of], recv_rows, send_rows, self.group)  # (m, dim)
        # Every row is overwritten below; `done` is built from `got` so that the dispatch's backward (an
        # all-to-all: every rank of the group must join it) runs on this rank even when it received no rows.
        done = got * 0
        for name, expert in self.local.items():
            rows = torch.where(got_experts == int(name))[0]
            if rows.numel():
                done = done.index_copy(0, rows, expert(got[rows]))
        back = fc.all_to_all_single_autograd(done, send_rows, recv_rows, self.group)  # (n k, dim), in `order`
        gate = weights.reshape(-1)[order].to(tokens.dtype)[:, None]  # (n k, 1)
        return torch.zeros_like(tokens).index_add(0, token_of, back * gate)


def shard_experts(modules: list[nn.Module], group: dist.ProcessGroup) -> int:
    """Replace the routed experts of every MoE layer among `modules` by this rank's share of them (the
    others are dropped); returns how many layers. The experts must be the readable loop experts."""
    count = 0
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, MoE):
                if not isinstance(layer.experts, LoopExperts):
                    raise ValueError(f"expert parallelism: expected moe_impl 'loop' (one module per expert), found "
                                     f"{type(layer.experts).__name__}")
                layer.experts = ExpertParallelExperts(layer.experts, group)
                count += 1
    return count
