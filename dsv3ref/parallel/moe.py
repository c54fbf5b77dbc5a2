"""Expert parallelism: the routed experts of a DeepSeekMoE layer split over ranks.

Rank r owns experts [r * E / world, (r + 1) * E / world). The router is replicated, so every rank
can route its tokens itself; what differs is how tokens meet the experts they chose (`moe_comm`):

- **"allreduce"** (DeepSeek's inference code, the exact baseline): every rank holds every token,
  computes its own experts' share of eq. 12 for the tokens that chose them, and an all-reduce adds
  the ranks' shares. Simple; but each rank receives the whole hidden state of every token, and the
  all-reduce moves a (tokens, dim) tensor whatever the routing.
- **"alltoall"** (DeepEP, torchtitan, SGLang): each rank holds its own tokens. Their (token, slot)
  assignments are sorted by owning rank; the ranks exchange counts, then dispatch each assignment's
  token vector, expert id and gate value with one `all_to_all_single` each; owners run their experts
  (grouped by expert) and send the results back the same way, and each token adds up its k results.
  A token vector travels only to the ranks that own one of its k experts (at most k of them).

With tensor-parallel attention (`layout="tp"`) every rank holds the same tokens; "alltoall" then
gives each rank a 1/world slice of them and gathers the results. With data-parallel attention
(`layout="dp"`) every rank holds different tokens (its own batch rows); "allreduce" then first
gathers all ranks' tokens. Both orders of summation are fixed, so results do not depend on timing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from einops import rearrange, reduce
from torch import nn

from dsv3ref.experts import StackedExperts
from dsv3ref.impl import check_choice
from dsv3ref.mlp import MLP
from dsv3ref.moe import MoE


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


def _stacked_rows(experts: StackedExperts, x: torch.Tensor, gate: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """ExpertSlice.forward for stacked experts: one grouped GEMM per projection (k = 1 per row)."""
    return experts.grouped(x, gate[:, None], (expert - experts.first_expert)[:, None])


class ParallelMoE(nn.Module):
    """A DeepSeekMoE layer (eq. 12) whose routed experts are split over the ranks of `group`.

    Same names as `dsv3ref.moe.MoE` (`gate`, `experts.{e}` for the experts this rank owns,
    `shared_experts`), so the checkpoint loads by name. The shared experts are the model's MLP, split
    column/row-parallel (its down_proj all-reduces) with layout "tp" and whole on every rank with "dp".
    """

    def __init__(self, moe: MoE, group: dist.ProcessGroup, layout: str, moe_comm: str, first: int, stop: int):
        super().__init__()
        self.group, self.layout = group, check_choice("layout", layout)
        self.moe_comm = check_choice("moe_comm", moe_comm)
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
        if self.moe_comm == "allreduce":
            out = self.all_reduce_experts(tokens, weights, ids)
        elif self.layout == "dp":
            out = self.all_to_all_experts(tokens, weights, ids)
        else:  # tensor-parallel attention: the same tokens everywhere; each rank dispatches a slice
            world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            mine = torch.tensor_split(torch.arange(tokens.shape[0], device=tokens.device), world)[rank]
            out = _all_gather_rows(self.all_to_all_experts(tokens[mine], weights[mine], ids[mine]), self.group)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return rearrange(out, "(b t) c -> b t c", b=x.shape[0])

    def local_rows(self, x: torch.Tensor, gate: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """gate * FFN_expert(x) for assignment rows whose experts this rank owns: (m, dim) each."""
        if isinstance(self.experts, StackedExperts):
            return _stacked_rows(self.experts, x, gate, expert)
        return self.experts(x, gate, expert)

    def all_reduce_experts(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """moe_comm "allreduce": this rank's experts on every token that chose them, summed over ranks."""
        n = tokens.shape[0]
        if self.layout == "dp":  # each rank holds other tokens: first gather everybody's
            counts = _all_gather_counts(n, tokens.device, self.group)
            tokens, weights, ids = (_all_gather_rows(t, self.group, counts) for t in (tokens, weights, ids))
        k = ids.shape[1]
        flat = rearrange(ids, "n k -> (n k)")
        rows = torch.where((flat >= self.first) & (flat < self.stop))[0]  # assignments to this rank's experts
        out = tokens.new_zeros(flat.shape[0], tokens.shape[1])
        out[rows] = self.local_rows(tokens[rows // k], rearrange(weights, "n k -> (n k)")[rows], flat[rows])
        out = reduce(out, "(n k) c -> n c", "sum", k=k)  # each token's k slots, in a fixed order
        dist.all_reduce(out, group=self.group)
        if self.layout == "dp":
            rank = dist.get_rank(self.group)
            start = int(counts[:rank].sum())
            out = out[start:start + n]
        return out

    def all_to_all_experts(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """moe_comm "alltoall": dispatch each (token, slot) to the rank owning its expert, compute, combine."""
        k = ids.shape[1]
        flat = rearrange(ids, "n k -> (n k)")  # (m,) the expert of each assignment
        owner = flat // self.per_rank
        order = torch.argsort(owner, stable=True)  # assignments grouped by destination rank
        send = torch.bincount(owner, minlength=dist.get_world_size(self.group))  # (world,) rows to each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # how many rows each rank sends here
        send_sizes, recv_sizes = send.tolist(), recv.tolist()

        def exchange(t: torch.Tensor, out_sizes: list[int], in_sizes: list[int]) -> torch.Tensor:
            out = t.new_empty(sum(out_sizes), *t.shape[1:])
            dist.all_to_all_single(out, t.contiguous(), out_sizes, in_sizes, group=self.group)
            return out

        # dispatch: the token vector, its expert and its gate value for every assignment
        x = exchange(tokens[order // k], recv_sizes, send_sizes)
        expert = exchange(flat[order], recv_sizes, send_sizes)
        gate = exchange(rearrange(weights, "n k -> (n k)")[order], recv_sizes, send_sizes)
        # compute, and send each result back to the rank its token came from
        back = exchange(self.local_rows(x, gate, expert), send_sizes, recv_sizes)
        rows = torch.empty_like(back)
        rows[order] = back  # back in (token, slot) order
        return reduce(rows, "(n k) c -> n c", "sum", k=k)


def _all_gather_counts(n: int, device: torch.device, group: dist.ProcessGroup) -> torch.Tensor:
    """(world,) the row count n of every rank."""
    counts = torch.zeros(dist.get_world_size(group), dtype=torch.long, device=device)
    parts = list(counts.split(1))
    dist.all_gather(parts, torch.tensor([n], device=device), group=group)
    return torch.cat(parts)


def _all_gather_rows(t: torch.Tensor, group: dist.ProcessGroup, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate every rank's rows of t (rank 0's first); ranks may hold different numbers of rows
    (padded to the largest for the exchange, the padding cut off again)."""
    if counts is None:
        counts = _all_gather_counts(t.shape[0], t.device, group)
    longest = int(counts.max())
    padded = t.new_zeros(longest, *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(len(counts))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:c] for part, c in zip(parts, counts.tolist(), strict=False)])
