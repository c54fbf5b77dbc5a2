"""DeepSeekMoE routing (DeepSeek-V3 report, section 2.1.2, eqs. 13-16).

For each token u_t the router computes an affinity per routed expert,

    s_{i,t} = sigmoid(u_t . e_i)                                  (eq. 15; softmax in DeepSeek-V2)

and chooses experts by the *biased* score s_{i,t} + b_i (eq. 16), where b_i is the auxiliary-loss-free
balancing bias (`e_score_correction_bias`). Choice is group-limited: the experts are split into
`n_group` groups, each group is ranked by the sum of its two best biased scores, only the best
`topk_group` groups stay eligible, and the top `num_experts_per_tok` experts among them are chosen.
The gate values use the *unbiased* scores of the chosen experts, normalized to sum to one (eq. 13)
and multiplied by `routed_scaling_factor`. The bias therefore changes which experts run, never how
much their outputs weigh.

Ties are broken towards the lower index (a stable sort), so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange, reduce
from torch import nn

from dsv3ref.config import ModelConfig


def _top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of the last axis, largest first, ties to the lower index."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def select_experts(
    scores: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    topk_method: str = "noaux_tc",
    return_groups: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k choice of experts.

    scores: (tokens, experts) affinities s_{i,t}; bias: (experts,) or None.
    Returns the chosen expert ids, (tokens, top_k), best first; with return_groups, also the
    eligible groups (tokens, topk_group), best first (all groups, in order, when routing is not
    group-limited).
    """
    choice = scores if bias is None else scores + bias  # (tokens, experts)
    if topk_method == "greedy" or n_group == 1:
        ids = _top_indices(choice, top_k)
        if not return_groups:
            return ids
        return ids, torch.arange(n_group, device=scores.device).expand(scores.shape[0], n_group)
    grouped = rearrange(choice, "n (g e) -> n g e", g=n_group)
    if topk_method == "noaux_tc":
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (tokens, groups)
    else:  # group_limited_greedy
        group_score = reduce(grouped, "n g e -> n g", "max")
    groups = _top_indices(group_score, topk_group)  # (tokens, topk_group)
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, groups, True)
    masked = grouped.masked_fill(~rearrange(keep, "n g -> n g 1"), float("-inf"))
    ids = _top_indices(rearrange(masked, "n g e -> n (g e)"), top_k)
    return (ids, groups) if return_groups else ids


@dataclass
class RoutingRecord:
    """What one router decided in one forward pass (see `dsv3ref.routing.capture`)."""

    scores: torch.Tensor
    """(tokens, experts) affinities s_{i,t}, before the bias (detached, unless captured with grad=True
    for a balance loss)."""
    groups: torch.Tensor
    """(tokens, topk_group) the groups each token could choose from."""
    ids: torch.Tensor
    """(tokens, top_k) the chosen experts."""
    weights: torch.Tensor
    """(tokens, top_k) their gate values g_{i,t} (normalized, times routed_scaling_factor)."""
    counts: torch.Tensor
    """(experts,) how many tokens chose each expert: the load."""


class Router(nn.Module):
    """The gate of an MoE layer: token -> (gate values, expert ids).

    Parameters as in the checkpoint: `weight` (experts, dim) and, for topk_method "noaux_tc", the
    buffer `e_score_correction_bias` (experts,), which is not trained by gradient descent.
    Scores are computed in float32 (float64 for float64 input) whatever the weights' dtype, and the
    bias is kept in at least float32 when the model is cast to bf16 (as the checkpoint stores it and
    DeepSeek's code keeps it: rounded to bf16 it could pick other experts).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.topk_method = cfg.topk_method
        self.scoring_func = cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None
        self.records: list[RoutingRecord] | None = None  # a list while dsv3ref.routing.capture is on
        self.record_grad = False  # capture(..., grad=True): keep the scores' graph (balance losses)
        self.choose: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by dsv3ref.routing.override

    def _apply(self, fn, recurse=True):
        """Dtype casts below float32 (`model.to(torch.bfloat16)`) leave the bias in float32; moves apply."""
        before = self._buffers.get("e_score_correction_bias")
        super()._apply(fn, recurse)
        after = self._buffers.get("e_score_correction_bias")
        if before is not None and after is not None and after.dtype in (torch.bfloat16, torch.float16):
            self._buffers["e_score_correction_bias"] = before.to(device=after.device, dtype=torch.float32)
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (tokens, dim) -> affinities s (tokens, experts), in at least float32."""
        compute = torch.promote_types(x.dtype, torch.float32)
        logits = x.to(compute) @ self.weight.to(compute).T  # (tokens, experts)
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (tokens, dim) -> weights (tokens, top_k) float32+, expert ids (tokens, top_k) int64."""
        s = self.scores(x)
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias.to(s.dtype)
        ids, groups = select_experts(s, bias, top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                                     topk_method=self.topk_method, return_groups=True)
        if self.choose is not None:  # dsv3ref.routing.override: another choice, the same gate-value rule
            # (the router still makes its own, as a real run would: records keep its groups)
            ids = self.choose(s)
        weights = s.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        if self.records is not None:
            counts = torch.bincount(ids.reshape(-1), minlength=self.weight.shape[0])
            self.records.append(RoutingRecord(scores=s if self.record_grad else s.detach(),
                                              groups=groups, ids=ids, weights=weights.detach(),
                                              counts=counts))
        return weights, ids
