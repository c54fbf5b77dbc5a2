"""The collectives of a split model, as operations that autograd and torch.compile see.

Every exchange between ranks goes through one of the functions below. Each is torch's functional
collective (`torch.distributed._functional_collectives`: an out-of-place op with a known output shape,
which torch.compile traces into its graph) inside a `torch.autograd.Function` whose backward is the
exchange that the gradient needs. So the same plan runs forward, backward and compiled.

Which backward is right depends on who owns the loss:

- **tensor-parallel work** ("tp": every rank holds the same tokens and computes the same loss): the
  pair Megatron-LM calls f and g. `replicated_input` (f) marks where a replicated tensor enters
  split work: identity forward, and its gradient, a partial sum on each rank, is all-reduced
  backward. `sum_partials` (g) adds the ranks' partial outputs (all-reduce) forward; the gradient of
  the replicated sum is already whole on every rank, so backward passes it through. `gather_parts`
  joins the ranks' parts of a replicated result (the vocabulary's logits); backward each rank keeps
  the gradient of its own part.
- **data-parallel work** ("dp": each rank its own tokens and its own loss, the total being their
  sum): `gather_rows` (backward: every rank's gradient for my rows, added up: a reduce-scatter),
  `sum_scatter_rows` (forward: a reduce-scatter; backward: an all-gather) and `exchange` (an
  all-to-all; backward: the reverse all-to-all) are the usual autograd of the collectives: torch's
  own (`*_autograd` in the functional collectives).

`exchange_sizes` swaps the row counts of an all-to-all (integers, no gradient). Process groups are
arguments; nothing is global.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def _done(t: torch.Tensor) -> torch.Tensor:
    """The finished result of a functional collective (eager calls return a handle still in flight)."""
    return funcol.wait_tensor(t)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _done(funcol.all_reduce(x, "sum", group))


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's x concatenated along dim, rank 0's first (all parts of one shape)."""
    out = _done(funcol.all_gather_single(x.movedim(dim, 0).contiguous(), 0, group))
    return out.movedim(0, dim)


def _part(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's equal part of x along dim."""
    return x.chunk(dist.get_world_size(group), dim)[dist.get_rank(group)]


class _ReplicatedInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _SumPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _part(grad, ctx.dim, ctx.group), None, None


def replicated_input(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """f: x as it enters tensor-parallel work (forward: x; backward: the ranks' gradients summed)."""
    return _ReplicatedInput.apply(x, group)


def sum_partials(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """g: the sum over the ranks of their partial results x (an all-reduce; backward: the gradient as is)."""
    return _SumPartials.apply(x, group)


def gather_parts(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The ranks' equal parts of a replicated result, joined along dim in rank order (backward: each
    rank takes the gradient of its own part)."""
    return _GatherParts.apply(x, dim, group)


def gather_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's rows x (m, ...), rank 0's first: (world * m, ...). Backward: each rank's gradient
    for these rows, summed over the ranks that used them."""
    return _done(funcol.all_gather_single_autograd(x.contiguous(), 0, group))


def sum_scatter_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x (world * m, ...) summed over the ranks; this rank keeps its m rows (a reduce-scatter)."""
    return _done(funcol.reduce_scatter_single_autograd(x.contiguous(), "sum", 0, group))


def exchange(x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group: dist.ProcessGroup
             ) -> torch.Tensor:
    """All-to-all of rows: x's first in_sizes[0] rows go to rank 0, the next in_sizes[1] to rank 1, ...;
    returns the rows every rank sent here (out_sizes[r] from rank r), in rank order."""
    return _done(funcol.all_to_all_single_autograd(x.contiguous(), out_sizes, in_sizes, group))


def exchange_sizes(send: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """send (world,): the rows this rank will send to each rank -> (world,) the rows each rank sends here."""
    return _done(funcol.all_to_all_single(send, None, None, group))


def all_gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup) -> torch.Tensor:
    """(world,) the row count n of every rank."""
    return _all_gather(torch.tensor([n], device=device), 0, group)
