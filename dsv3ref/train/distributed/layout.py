"""Where every rank sits: pipeline stage, expert shard and data shard (the report's section 3.2).

DeepSeek-V3 was trained on 2,048 GPUs as PP16 x EP64 x ZeRO-1 DP, with no tensor parallelism. Here a
layout is `pp x ep x dp` processes:

- **pp**: the layers are cut into pipeline stages (one per rank, or two per rank for the V-shaped
  schedules `zbv` and `dualpipev`, which put the first and the last stage on rank 0);
- **ep**: the routed experts of every MoE layer are split over `ep` ranks. As in the report, expert
  parallelism is folded into data parallelism: the `ep` ranks of a group read *different* tokens,
  send each token to the ranks of its chosen experts (all-to-all) and take the results back;
- **dp**: plain data-parallel replicas of all of it.

So a pipeline stage's dense parameters (attention, router, shared expert, norms) are replicated over
the `ep * dp` ranks that read different tokens (the "data" group: gradients summed there), and each
routed expert over the `dp` ranks holding the same expert shard (the "dp" group). The optimizer state
is sharded over those same groups (ZeRO-1).

Rank numbering: rank = (pp_rank * dp + dp_rank) * ep + ep_rank, so an expert group is made of
neighbouring ranks (on GPUs: one node's NVLink domain, the report's intra-node all-to-all).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

SCHEDULES = ("gpipe", "1f1b", "zb1p", "zbv", "dualpipev")
"""torch.distributed.pipelining's GPipe, 1F1B, zero-bubble 1F1B (ZB1P: the backward split into input and
weight passes), ZBVZeroBubble and DualPipeV schedules."""
V_SCHEDULES = ("zbv", "dualpipev")
"""Two stages per rank in a V: rank r holds stages r and 2 pp - 1 - r."""


@dataclass(frozen=True)
class Layout:
    """pp pipeline ranks x ep expert shards x dp replicas; the pipeline schedule and its micro-batches."""

    pp: int = 1
    ep: int = 1
    dp: int = 1
    schedule: str = "1f1b"
    microbatches: int = 4
    """Micro-batches per step on every data shard (DualPipeV needs at least one per stage)."""

    def __post_init__(self) -> None:
        for name in ("pp", "ep", "dp", "microbatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, found {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, found {self.schedule!r}")
        if self.schedule == "dualpipev" and self.microbatches < self.num_stages:
            raise ValueError(f"microbatches: DualPipeV needs at least one per stage ({self.num_stages} stages for "
                             f"pp={self.pp}), found {self.microbatches}")

    @property
    def world_size(self) -> int:
        return self.pp * self.ep * self.dp

    @property
    def data_shards(self) -> int:
        """Ranks of one pipeline stage that read different tokens (ep x dp)."""
        return self.ep * self.dp

    @property
    def num_stages(self) -> int:
        return self.pp * (2 if self.schedule in V_SCHEDULES else 1)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, ep_rank) of a global rank."""
        return rank // (self.dp * self.ep), rank // self.ep % self.dp, rank % self.ep

    def rank(self, pp_rank: int, dp_rank: int, ep_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.ep + ep_rank

    def data_shard(self, rank: int) -> int:
        """Which slice of the global batch a rank reads: its (dp_rank, ep_rank), in that order."""
        _, dp_rank, ep_rank = self.coords(rank)
        return dp_rank * self.ep + ep_rank

    def stages_of(self, pp_rank: int) -> list[int]:
        """The pipeline stages a pipeline rank holds: [r], or [r, 2 pp - 1 - r] in a V."""
        if self.schedule in V_SCHEDULES:
            return [pp_rank, 2 * self.pp - 1 - pp_rank]
        return [pp_rank]

    def check(self, world_size: int, num_layers: int, n_experts: int, batch_size: int) -> None:
        """ValueError naming the setting if this layout cannot run the model and batch on world_size ranks."""
        if self.world_size != world_size:
            raise ValueError(f"layout: pp {self.pp} x ep {self.ep} x dp {self.dp} = {self.world_size} ranks, but the "
                             f"job has {world_size} (torchrun --nproc-per-node)")
        if self.num_stages > num_layers:
            raise ValueError(f"pp: {self.num_stages} pipeline stages ({self.schedule}, pp={self.pp}) need at least as "
                             f"many decoder layers, the model has {num_layers}")
        if n_experts % self.ep:
            raise ValueError(f"ep: {self.ep} does not divide the model's {n_experts} routed experts")
        per_step = self.data_shards * self.microbatches
        if batch_size % per_step:
            raise ValueError(f"batch_size: {batch_size} sequences do not split into {self.data_shards} data shard(s) "
                             f"(ep x dp) x {self.microbatches} micro-batches; expected a multiple of {per_step}")


def collective_device() -> torch.device:
    """Where the small tensors of a collective (flags, sums, loads) must live: the GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Decoder layers of each stage: contiguous, as even as possible, the earlier stages one more."""
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


@dataclass
class Groups:
    """This rank's process groups (torch.distributed), each built on every rank in the same order."""

    layout: Layout
    rank: int
    pp: dist.ProcessGroup  # the pipeline: same (dp, ep)
    ep: dist.ProcessGroup  # the expert shards: same (pp, dp)
    dp: dist.ProcessGroup  # replicas of the same expert shard: same (pp, ep)
    data: dist.ProcessGroup  # ranks of one stage reading different tokens: same pp
    tied: dist.ProcessGroup | None
    """First and last pipeline rank of this pipeline (both hold the embedding, which the first stage reads
    and the MTP module beside the head shares), when they differ; None in a V or without a pipeline."""

    @classmethod
    def build(cls, layout: Layout, timeout: timedelta) -> Groups:
        """Every group of the layout (collective: all ranks call it)."""
        rank = dist.get_rank()

        def family(vary: tuple[str, ...]) -> dist.ProcessGroup:
            """The groups of ranks that differ only in the coordinates `vary`; returns this rank's."""
            members: dict[tuple[int, ...], list[int]] = {}
            for r in range(layout.world_size):
                coord = dict(zip(("pp", "dp", "ep"), layout.coords(r), strict=True))
                members.setdefault(tuple(v for k, v in coord.items() if k not in vary), []).append(r)
            mine = None
            for key in sorted(members):
                group = dist.new_group(members[key], timeout=timeout)
                if rank in members[key]:
                    mine = group
            return mine

        groups = {"pp": family(("pp",)), "ep": family(("ep",)), "dp": family(("dp",)), "data": family(("dp", "ep"))}
        tied = None
        if layout.pp > 1 and layout.schedule not in V_SCHEDULES:
            for d in range(layout.dp):
                for e in range(layout.ep):
                    pair = [layout.rank(0, d, e), layout.rank(layout.pp - 1, d, e)]
                    group = dist.new_group(pair, timeout=timeout)
                    if rank in pair:
                        tied = group
        return cls(layout, rank, tied=tied, **groups)
