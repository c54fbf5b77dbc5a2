"""Seeing and steering the routers: capture their decisions, balance their load.

Capture (off by default; when off, a router does one `is None` check):

    with dsv3ref.routing.capture(model) as records:
        model(input_ids)
    records[3][0].counts    # layer 3, first forward pass: tokens per expert

Override: `with dsv3ref.routing.override(model, choose):` makes every router take its experts from
choose(layer index, scores) instead of its own group-limited top-k (the gate values still follow
eq. 13 from the scores of the experts chosen): a what-if for load and communication studies, and how
dsv3ref.parallel.simulation routes tokens that have no values.

Auxiliary-loss-free balancing (DeepSeek-V3 report, section 2.1.2). Each routed expert i has a bias
b_i that is added to its affinity for the *choice* of experts only (eq. 16). After every training
step, with load_i the number of tokens expert i received in the step,

    b_i <- b_i + gamma * sign(mean_j load_j - load_i)

so overloaded experts become less attractive and idle ones more (`update_bias`; the report uses
gamma = 0.001 for the first 14.3T tokens, then 0). No gradient flows through b.

Complementary sequence-wise balance loss (eqs. 17-20), which keeps any single sequence from
piling onto a few experts; with T tokens in the sequence, N_r routed experts, K_r chosen per token:

    s'_{i,t} = s_{i,t} / sum_j s_{j,t}                     (scores normalized over all experts)
    P_i = (1/T) sum_t s'_{i,t}
    f_i = N_r / (K_r T) * sum_t 1[expert i is among token t's K_r]
    L_Bal = alpha * sum_i f_i P_i                          (alpha = 0.0001 in the report)

`sequence_balance_loss` computes it per sequence and averages over the batch; the gradient reaches
the router through P (f is a count).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from einops import reduce
from torch import nn

from dsv3ref.router import Router, RoutingRecord

DEFAULT_GAMMA = 0.001
DEFAULT_ALPHA = 0.0001


def routers(model: nn.Module) -> dict[int, Router]:
    """The router of every MoE layer (also of a layer split over processes), by layer index."""
    return {layer.layer_idx: layer.mlp.gate for layer in model.model.layers
            if isinstance(getattr(layer.mlp, "gate", None), Router)}


@contextmanager
def capture(model: nn.Module, grad: bool = False) -> Iterator[dict[int, list[RoutingRecord]]]:
    """Record every router decision made inside the `with` block, per MoE layer, per forward pass.
    grad=True keeps the scores attached to the graph, for a balance loss (training)."""
    found = routers(model)
    records: dict[int, list[RoutingRecord]] = {i: [] for i in found}
    for i, router in found.items():
        router.records, router.record_grad = records[i], grad
    try:
        yield records
    finally:
        for router in found.values():
            router.records, router.record_grad = None, False


@contextmanager
def override(model: nn.Module, choose: Callable[[int, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside the `with` block, the router of MoE layer i chooses choose(i, scores) for tokens with
    affinities scores (tokens, experts): expert ids (tokens, top_k), each row distinct experts."""
    found = routers(model)
    for i, router in found.items():
        router.choose = partial(choose, i)
    try:
        yield
    finally:
        for router in found.values():
            router.choose = None


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """b_i += gamma * sign(mean(load) - load_i), in place; returns bias.

    bias (experts,), the router's e_score_correction_bias; load (experts,), tokens per expert in the
    step just taken (e.g. the sum of `RoutingRecord.counts` over the step's forward passes).
    """
    if bias.shape != load.shape:
        raise ValueError(f"load: expected shape {tuple(bias.shape)} like the bias, found {tuple(load.shape)}")
    load = load.to(torch.float64)
    return bias.add_((gamma * torch.sign(load.mean() - load)).to(bias.dtype))


def sequence_balance_loss(scores: torch.Tensor, ids: torch.Tensor, n_experts: int | None = None,
                          alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """L_Bal of eqs. 17-20, averaged over the sequences of the batch.

    scores (batch, tokens, experts): the router's affinities s_{i,t} (before bias);
    ids (batch, tokens, K_r): the chosen experts. Returns a scalar.
    """
    b, t, n = scores.shape
    n_experts = n_experts or n
    k = ids.shape[-1]
    normalized = scores / scores.sum(dim=-1, keepdim=True)  # s'_{i,t}
    p = reduce(normalized, "b t e -> b e", "mean")  # P_i
    chosen = torch.zeros(b, t, n_experts, dtype=scores.dtype, device=scores.device).scatter_(2, ids, 1.0)
    f = reduce(chosen, "b t e -> b e", "sum") * n_experts / (k * t)  # f_i
    return alpha * (f.detach() * p).sum(-1).mean()
