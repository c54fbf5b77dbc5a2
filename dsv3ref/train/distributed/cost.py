"""What the report's training layout costs per GPU: parameters, bytes and all-to-all traffic.

DeepSeek-V3 trained on 2,048 H800 GPUs (256 nodes of 8) with 16-way pipeline parallelism, 64-way
expert parallelism over 8 nodes and ZeRO-1 data parallelism, no tensor parallelism (report section
3.2). `footprint` counts, for that layout or another, what one GPU holds and what one token moves:

- parameters: each pipeline rank holds its decoder layers (`layout.split_layers`; the embedding on the
  first, the final norm, head and MTP module on the last), whole except the routed experts, split over
  the `ep` ranks of its expert group; the heaviest rank is reported;
- bytes: BF16 weights (2 B) and FP32 gradients (4 B) of everything the GPU holds, and the optimizer's
  FP32 master weights (4 B) and BF16 AdamW moments (2 x 2 B) sharded over the GPUs that hold the same
  parameter (ZeRO-1: gpus / pp for the dense part, gpus / (pp x ep) for the experts);
- traffic of one token through one MoE layer, forward: it is sent over InfiniBand once to each node
  holding one of its experts (at most `nodes_per_token`: the report's node-limited routing, M = 4) in
  FP8 with its scales and routing (`dsv3ref.kernels.ep.dispatch_bytes`), forwarded over NVLink to the
  GPUs of its experts (at most top-k), and its expert outputs come back the same way in BF16. The
  backward pass moves the same amounts the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3ref.config import ModelConfig
from dsv3ref.kernels.ep import dispatch_bytes
from dsv3ref.params import count_parameters
from dsv3ref.train.distributed.layout import split_layers


@dataclass(frozen=True)
class Footprint:
    """One GPU's share under a training layout (see the module docstring)."""

    dense_params: int
    """Non-expert parameters on the heaviest pipeline rank."""
    expert_params: int
    """Its routed-expert parameters (its 1/ep share of its layers' experts)."""
    bytes: dict[str, int]
    """"weights (BF16)", "gradients (FP32)", "master weights (FP32, ZeRO-1)", "AdamW moments (BF16, ZeRO-1)"."""
    ib_bytes_per_token: int
    """Forward InfiniBand bytes of one token through one MoE layer (dispatch + combine), at most."""
    nvlink_bytes_per_token: int
    """Forward NVLink bytes of the same, at most."""

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def footprint(cfg: ModelConfig, gpus: int = 2048, pp: int = 16, ep: int = 64, nodes_per_token: int = 4) -> Footprint:
    """The footprint of cfg trained on `gpus` GPUs as pp pipeline ranks x ep expert shards (the rest data
    parallel); defaults: the report's layout and node limit."""
    if gpus % (pp * ep):
        raise ValueError(f"gpus: {gpus} is not a multiple of pp x ep = {pp * ep}")
    if cfg.n_routed_experts % ep:
        raise ValueError(f"ep: {ep} does not divide the {cfg.n_routed_experts} routed experts")
    count = count_parameters(cfg)
    experts_per_layer = cfg.n_routed_experts * count.routed_expert
    ranks = []
    for r, layers in enumerate(split_layers(cfg.num_hidden_layers, pp)):
        dense = expert = 0
        for i in layers:
            moe = cfg.is_moe_layer(i)
            dense += count.per_layer[i] - (experts_per_layer if moe else 0)
            expert += experts_per_layer // ep if moe else 0
        if r == 0:
            dense += count.embedding
        if r == pp - 1:
            n_mtp = cfg.num_nextn_predict_layers
            dense += count.head + cfg.hidden_size + count.mtp - n_mtp * experts_per_layer  # + final norm
            expert += n_mtp * experts_per_layer // ep
        ranks.append((dense + expert, dense, expert))
    _, dense, expert = max(ranks)
    dense_replicas, expert_replicas = gpus // pp, gpus // (pp * ep)
    held = dense + expert
    sharded = dense / dense_replicas + expert / expert_replicas
    sizes = {
        "weights (BF16)": 2 * held,
        "gradients (FP32)": 4 * held,
        "master weights (FP32, ZeRO-1)": round(4 * sharded),
        "AdamW moments (BF16, ZeRO-1)": round(2 * 2 * sharded),
    }
    nodes = min(nodes_per_token, cfg.num_experts_per_tok)
    sent = dispatch_bytes(cfg.hidden_size, cfg.num_experts_per_tok, use_fp8=True)
    back = cfg.hidden_size * torch.empty((), dtype=torch.bfloat16).element_size()
    return Footprint(dense, expert, sizes, ib_bytes_per_token=nodes * (sent + back),
                     nvlink_bytes_per_token=cfg.num_experts_per_tok * (sent + back))
