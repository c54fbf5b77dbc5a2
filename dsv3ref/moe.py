"""The DeepSeekMoE layer: shared experts plus routed experts (DeepSeek-V3 report, eq. 12).

    h'_t = u_t + sum_{i <= N_s} FFN_i^(s)(u_t) + sum_{i <= N_r} g_{i,t} FFN_i^(r)(u_t)

(the residual u_t is added by the decoder block). The N_s shared experts are stored fused as one
MLP of width N_s * moe_intermediate_size, as in the checkpoint.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from dsv3ref.config import ModelConfig
from dsv3ref.experts import StackedExperts
from dsv3ref.impl import CHOICES, check_choice
from dsv3ref.mlp import MLP
from dsv3ref.router import Router

MOE_IMPLS = CHOICES["moe_impl"]  # the vocabulary's values (dsv3ref.impl)


class MoE(nn.Module):
    """Routed + shared experts with the checkpoint's names: `gate`, `experts.{e}`, `shared_experts`.

    moe_impl "loop": the experts are separate MLPs run one at a time (the readable oracle);
    "grouped": the experts' weights are stacked and run as grouped GEMMs (dsv3ref.experts).
    """

    def __init__(self, cfg: ModelConfig, moe_impl: str = "loop"):
        super().__init__()
        self.moe_impl = check_choice("moe_impl", moe_impl)
        self.gate = Router(cfg)
        if moe_impl == "loop":
            self.experts = LoopExperts(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                       for _ in range(cfg.n_routed_experts))
        else:
            self.experts = StackedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, t, dim) -> (b, t, dim)."""
        tokens = rearrange(x, "b t c -> (b t) c")
        weights, ids = self.gate(tokens)  # (n, k), (n, k)
        out = self.experts(tokens, weights, ids)  # (n, dim): sum of g * expert output
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return rearrange(out, "(b t) c -> b t c", b=x.shape[0])


class LoopExperts(nn.ModuleList):
    """The routed experts as separate MLPs (`experts.{e}.gate_proj`, ...), run one at a time."""

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The readable oracle: visit each expert, run it on the tokens routed to it, add g * output.

        tokens (n, dim), weights (n, k), ids (n, k) -> (n, dim).
        """
        if torch.compiler.is_compiling() and ids.numel() <= len(self):
            # Decode-sized input under torch.compile: static shapes, every expert on every token, weighted
            # by the token's gate value for it (zero where not chosen): n_experts / k times the work, the
            # loop's result to float rounding. (moe_impl="grouped" gathers just the chosen experts.)
            gates = torch.zeros(tokens.shape[0], len(self), dtype=tokens.dtype, device=tokens.device)
            gates = gates.scatter(1, ids, weights.to(tokens.dtype))  # (n, experts)
            return sum(expert(tokens) * gates[:, e, None] for e, expert in enumerate(self))
        return self.loop(tokens, weights, ids)

    @torch.compiler.disable  # sizes that depend on the routing: always eager, between compiled parts
    def loop(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One expert at a time, on the tokens routed to it (see `forward`).

        The (token, slot) assignments are sorted by expert (stably: tokens in order within an expert) and
        the routed rows gathered once; expert e runs on its slice of them and adds g * output to its
        tokens' outputs, expert after expert, as DeepSeek's loop does (in bf16 each add rounds). (One
        gather for all experts, not one per expert: in training each gather's backward fills a zero
        gradient of all n tokens. It holds all n k routed rows at once, as the grouped path does.)
        """
        n, k = ids.shape
        order = torch.argsort(ids.reshape(-1), stable=True)  # (n k,) assignments grouped by expert
        counts = torch.bincount(ids.reshape(-1), minlength=len(self)).tolist()  # assignments per expert
        # Expert e's part of each, by one split (its backward joins the parts once; slicing per expert would
        # give each slice's backward a zero gradient of the whole).
        token = order // k  # the token of each assignment
        token_idx = token.split(counts)  # the tokens
        rows = tokens[token].split(counts)  # their rows, gathered once
        gates = weights.reshape(-1)[order, None].to(tokens.dtype).split(counts)  # their gate values (m, 1)
        out = torch.zeros_like(tokens)
        for expert, idx, x, gate in zip(self, token_idx, rows, gates, strict=True):
            if len(idx):
                out.index_add_(0, idx, expert(x) * gate)
        return out
