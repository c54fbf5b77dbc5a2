"""Expert parallelism: the routed experts of a DeepSeekMoE layer split over ranks.

Rank r owns experts [r * E / world, (r + 1) * E / world). The router is replicated, so every rank
can route its tokens itself; what differs is how tokens meet the experts they chose (`moe_comm`):

- **"allreduce"** (DeepSeek's inference code, the exact baseline): every rank holds every token,
  computes its own experts' share of eq. 12 for the tokens that chose them, and the ranks' shares are
  added. With tensor-parallel attention (`layout="tp"`) the shared expert's partial sum (its width
  is split too) is added to the routed share first, so one all-reduce of the (tokens, dim) output
  serves both. With data-parallel attention (`layout="dp"`) every rank first gathers all ranks'
  tokens, and a reduce-scatter hands each rank the sums of its own rows.
- **"alltoall"** (DeepEP's normal mode, torchtitan, SGLang): each rank holds its own tokens. A token
  travels once to every rank owning at least one of its k experts (dispatch), with the expert ids
  and gate values of the slots that rank serves; the owner adds up its slots' g * FFN(x) and sends
  one vector back (combine), and each token adds the vectors it gets in rank order. With "tp" every
  rank holds the same tokens: each dispatches its 1/world slice of them, the shared expert's partial
  sums are reduce-scattered onto the same slices, and one all-gather joins the slices.

Every sum runs in a fixed order, so results do not depend on timing. The exchanges are the
autograd-aware collectives of dsv3ref.parallel.comm, so gradients flow back the way tokens came.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from dsv3ref.experts import StackedExperts
from dsv3ref.impl import check_choice
from dsv3ref.mlp import MLP
from dsv3ref.moe import MoE
from dsv3ref.parallel.comm import (
    all_gather_sizes,
    exchange,
    exchange_sizes,
    gather_parts,
    gather_rows,
    replicated_input,
    sum_partials,
    sum_scatter_rows,
)


class ExpertSlice(nn.ModuleDict):
    """This rank's routed experts, as separate MLPs under their checkpoint numbers (`"17"` ->
    `mlp.experts.17.gate_proj.weight`, ...), run one at a time (the readable path)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Assignment rows: x (m, dim), gate value (m,), expert number (m,) -> gate * FFN_expert(x), (m, dim)."""
        out = torch.zeros_like(x)
        for number, mlp in self.items():
            rows = torch.where(expert == int(number))[0]
            if rows.numel():
                out[rows] = mlp(x[rows]) * gate[rows, None].to(x.dtype)
        return out

    def dense(self, x: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Static shapes for torch.compile: every token through every expert here, weighted by its gate
        value for that expert (zero where not chosen). x (n, dim), gates and ids (n, k) -> (n, dim)."""
        out = torch.zeros_like(x)
        for number, mlp in self.items():
            weight = (gates * (ids == int(number))).sum(-1, keepdim=True).to(x.dtype)  # (n, 1)
            out = out + mlp(x) * weight
        return out


class ParallelMoE(nn.Module):
    """A DeepSeekMoE layer (eq. 12) whose routed experts are split over the ranks of `group`.

    Same names as `dsv3ref.moe.MoE` (`gate`, `experts.{e}` for the experts this rank owns,
    `shared_experts`), so the checkpoint loads by name. With layout "tp" the shared experts' width is
    split column/row-parallel by the plan and their partial output is summed here, with the routed
    experts'; with "dp" they are whole on every rank.
    """

    def __init__(self, moe: MoE, group: dist.ProcessGroup, layout: str, moe_comm: str, first: int, stop: int):
        super().__init__()
        self.group, self.layout = group, check_choice("layout", layout)
        self.moe_comm = check_choice("moe_comm", moe_comm)
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.first, self.stop = first, stop  # this rank's experts: [first, stop)
        self.per_rank = stop - first
        self.gate = moe.gate
        if isinstance(moe.experts, StackedExperts):
            old = moe.experts
            old.gate_up_proj = nn.Parameter(old.gate_up_proj.detach()[first:stop].clone(),
                                            requires_grad=old.gate_up_proj.requires_grad)
            old.down_proj = nn.Parameter(old.down_proj.detach()[first:stop].clone(),
                                         requires_grad=old.down_proj.requires_grad)
            old.n_experts, old.first_expert = stop - first, first
            self.experts: nn.Module = old
        else:
            self.experts = ExpertSlice({str(e): moe.experts[e] for e in range(first, stop)})
        self.shared_experts: MLP | None = moe.shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, t, dim) -> (b, t, dim), equal to MoE.forward of the whole layer."""
        tokens = rearrange(x, "b t c -> (b t) c")
        weights, ids = self.gate(tokens)  # (n, k) each: every rank routes its own tokens
        if self.layout == "tp":
            out = self.tensor_parallel(tokens, weights, ids)
        else:
            out = self.data_parallel(tokens, weights, ids)
        return rearrange(out, "(b t) c -> b t c", b=x.shape[0])

    def tensor_parallel(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every rank holds the same n tokens (n, dim); returns the layer's output for all of them."""
        # Split work starts here: backward sums the ranks' gradients of the tokens and the gate values
        # (the router itself is replicated, and sees whole gradients).
        x, weights = replicated_input(tokens, self.group), replicated_input(weights, self.group)
        shared = self.shared_experts(x) if self.shared_experts is not None else None  # this rank's partial sum
        if self.moe_comm == "allreduce":
            local = self.local_ids(ids)
            partial = self.static_sum(x, weights, local) if torch.compiler.is_compiling() else self.local_sum(
                x, weights, local)
            return sum_partials(partial if shared is None else partial + shared, self.group)
        n, world = tokens.shape[0], self.world
        m = -(-n // world)  # each rank dispatches rows [rank * m, (rank + 1) * m) (the last ones padded)
        mine = slice(min(self.rank * m, n), min((self.rank + 1) * m, n))
        routed = F.pad(self.dispatch_combine(x[mine], weights[mine], ids[mine]),
                       (0, 0, 0, m - (mine.stop - mine.start)))  # (m, dim)
        if shared is not None:
            routed = routed + sum_scatter_rows(F.pad(shared, (0, 0, 0, world * m - n)), self.group)
        return gather_parts(routed, 0, self.group)[:n]

    def data_parallel(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every rank holds its own n tokens (n, dim); returns the layer's output for them."""
        if self.moe_comm == "allreduce":
            n = tokens.shape[0]
            longest = int(all_gather_sizes(n, tokens.device, self.group).max())  # rows padded to one size
            pad = longest - n
            every = [gather_rows(F.pad(t, (0, 0, 0, pad), value=v), self.group)
                     for t, v in ((tokens, 0), (weights, 0), (ids, -1))]  # all ranks' rows, -1: padding
            routed = sum_scatter_rows(self.local_sum(every[0], every[1], self.local_ids(every[2])), self.group)[:n]
        else:
            routed = self.dispatch_combine(tokens, weights, ids)
        return routed if self.shared_experts is None else routed + self.shared_experts(tokens)

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Expert ids (n, k) with -1 in the slots whose expert another rank owns."""
        return torch.where((ids >= self.first) & (ids < self.stop), ids, -1)

    def local_sum(self, x: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum over the slots j with ids[:, j] >= 0 of gates[:, j] * FFN_{ids[:, j]}(x): x (m, dim), gates
        and ids (m, k), the ids this rank's experts -> (m, dim). Each row's slots are added in order."""
        k = ids.shape[1]
        flat = rearrange(ids, "m k -> (m k)")
        slots = torch.where(flat >= 0)[0]  # the (row, slot) assignments served here
        rows = x.new_zeros(flat.shape[0], x.shape[1])
        rows[slots] = self.local_rows(x[slots // k], rearrange(gates, "m k -> (m k)")[slots], flat[slots])
        return reduce(rows, "(m k) c -> m c", "sum", k=k)

    def static_sum(self, x: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`local_sum` with shapes that do not depend on the routing, for torch.compile (one graph per
        decode step): stacked experts gather each slot's weights (a slot served elsewhere takes this
        rank's first expert with gate value zero); separate experts run on every token, weighted by its
        gate value for them (zero where not chosen)."""
        if isinstance(self.experts, StackedExperts):
            here = ids >= 0
            return self.experts.gathered(x, gates * here, torch.where(here, ids - self.first, 0))
        return self.experts.dense(x, gates, ids)

    def local_rows(self, x: torch.Tensor, gate: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """gate * FFN_expert(x) for assignment rows whose experts this rank owns: (a, dim) each."""
        if isinstance(self.experts, StackedExperts):
            return self.experts.grouped(x, gate[:, None], (expert - self.experts.first_expert)[:, None])
        return self.experts(x, gate, expert)

    def dispatch_combine(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """moe_comm "alltoall" for this rank's tokens x (n, dim) with their gate values and expert ids
        (n, k): each token goes once to each rank owning one of its experts, comes back as that rank's
        sum of its slots, and the returns are added in rank order. Returns (n, dim)."""
        n, k = ids.shape
        owner = ids // self.per_rank  # (n, k): the rank that owns each chosen expert
        goes = torch.zeros(n, self.world, dtype=torch.bool, device=x.device).scatter_(1, owner, True)  # (n, world)
        dest, token = torch.nonzero(rearrange(goes, "n w -> w n"), as_tuple=True)  # pairs, by destination
        send = goes.sum(0)  # (world,) tokens sent to each rank
        send_sizes, recv_sizes = send.tolist(), exchange_sizes(send, self.group).tolist()
        here = owner[token] == dest[:, None]  # (pairs, k): the slots the destination serves
        pair_ids = torch.where(here, ids[token], -1).to(torch.int32)
        pair_gates = torch.where(here, weights[token], 0).to(x.dtype)
        # dispatch: each pair's token vector, and its slots' expert ids and gate values
        got_x = exchange(x[token], recv_sizes, send_sizes, self.group)
        got_ids = exchange(pair_ids, recv_sizes, send_sizes, self.group).long()
        got_gates = exchange(pair_gates, recv_sizes, send_sizes, self.group)
        # compute this rank's slots, and combine: send each sum back to the token's rank
        back = exchange(self.local_sum(got_x, got_gates, got_ids), send_sizes, recv_sizes, self.group)  # (pairs, c)
        width = min(k, self.world)  # a token reaches at most this many ranks
        place = (goes.cumsum(1) - 1)[token, dest]  # (pairs,): which of its ranks the pair is, in rank order
        returns = x.new_zeros(n, width, x.shape[1])
        returns[token, place] = back
        return reduce(returns, "n w c -> n c", "sum")
