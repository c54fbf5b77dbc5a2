"""Pipeline schedules played out: each schedule's own action list, timed with costs F, B, W and F&B.

torch.distributed.pipelining's schedules decide, for every rank, the order of its compute actions:
F (forward of one micro-batch through one stage), B (its full backward), I and W (the backward split
into the input-gradient part, B - W, and the weight-gradient part W, which zero-bubble schedules
delay to fill gaps) and, in DualPipeV, OVERLAP_F_B: a forward of one micro-batch and a backward of
another run together, so that each one's all-to-all hides behind the other's computation (on
DeepSeek's GPUs; torch runs the pair one after the other). `action_lists` takes those lists from the
schedule objects themselves (built on torch's fake process group: no processes, no tensors), and
`play` runs them as fast as the dependencies allow:

    F(s, m) after F(s-1, m);   B or I (s, m) after F(s, m) and B or I (s+1, m);   W(s, m) after I(s, m)

with zero communication time. The bubble of a rank is the step's length less its busy time, which is
what the report's Table 2 counts:

| schedule | bubble                 | parameters | activations |
|----------|------------------------|------------|-------------|
| 1F1B     | (PP-1)(F+B)            | 1x         | PP          |
| ZB1P     | (PP-1)(F+B-2W)         | 1x         | PP          |
| DualPipe | (PP/2-1)(F&B+B-3W)     | 2x         | PP+1        |

DualPipeV is DualPipe cut in half (DeepSeek's DualPipe repository): its P ranks hold the 2P stages of
one model copy in a V, as DualPipe's 2P ranks would hold them, so its bubble is DualPipe's with PP = 2P.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _Action, _ComputationType

from dsv3ref.train.distributed.layout import V_SCHEDULES
from dsv3ref.train.distributed.stages import SCHEDULE_CLASSES

TIMED = ("1f1b", "zb1p", "zbv", "dualpipev")
"""The schedules whose action list is the one they run (GPipe runs a loop of its own)."""
_KINDS = {_ComputationType.FORWARD: "F", _ComputationType.FULL_BACKWARD: "B", _ComputationType.BACKWARD_INPUT: "I",
          _ComputationType.BACKWARD_WEIGHT: "W", _ComputationType.OVERLAP_F_B: "F&B"}


@dataclass(frozen=True)
class Costs:
    """Times of one stage's work on one micro-batch: forward F, full backward B (= I + W), its weight part W,
    and F&B, a forward and a backward of two micro-batches overlapped."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float = 2.5


@dataclass(frozen=True)
class Slot:
    """One action on the timeline: rank, start, end, kind ("F", "B", "I", "W", "F&B") and the
    (stage, micro-batch) pairs it computes (two for F&B: the forward's first)."""

    rank: int
    start: float
    end: float
    kind: str
    work: tuple[tuple[int, int], ...]


@dataclass
class Timeline:
    slots: list[Slot]
    length: float
    bubble: dict[int, float]
    """Per rank: length less busy time."""
    peak_activations: dict[int, int]
    """Per rank: the most micro-batch x stage activations held at once (from a forward's start to the
    end of the backward that frees them: W, or B when not split)."""


def action_lists(schedule: str, pp: int, microbatches: int) -> tuple[dict[int, list[_Action]], int]:
    """The schedule's compute actions for each of pp ranks, and the number of stages, as torch builds
    them (`pipeline_order`), on a fake process group of pp ranks that this function starts and ends."""
    if schedule not in TIMED:
        raise ValueError(f"schedule: expected one of {TIMED}, found {schedule!r}")
    if dist.is_initialized():
        raise RuntimeError("action_lists builds the schedule on a fake process group of its own; call it outside "
                           "a distributed job")
    with warnings.catch_warnings():  # torch's testing package warns about its own deprecated jit uses on import
        warnings.simplefilter("ignore")
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    num_stages = pp * (2 if schedule in V_SCHEDULES else 1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=pp)
    try:
        example = torch.empty(1, 1)
        stage_ids = [0, num_stages - 1] if schedule in V_SCHEDULES else [0]
        stages = [PipelineStage(nn.Identity(), s, num_stages, torch.device("cpu"), input_args=example,
                                output_args=example) for s in stage_ids]
        sched = SCHEDULE_CLASSES[schedule](stages, n_microbatches=microbatches, loss_fn=lambda out, target: out)
        order = {rank: [a for a in actions if a is not None and a.computation_type in _KINDS]
                 for rank, actions in sched.pipeline_order.items()}
    finally:
        dist.destroy_process_group()
    return order, num_stages


def _key(action: _Action) -> tuple[str, int, int]:
    kind = _KINDS[action.computation_type]
    return ("W" if kind == "W" else "F" if kind == "F" else "B", action.stage_index, action.microbatch_index)


def _needs(action: _Action, num_stages: int) -> list[tuple[str, int, int]]:
    kind, s, m = _KINDS[action.computation_type], action.stage_index, action.microbatch_index
    if kind == "F":
        return [("F", s - 1, m)] if s > 0 else []
    if kind in ("B", "I"):
        return [("F", s, m)] + ([("B", s + 1, m)] if s < num_stages - 1 else [])
    return [("B", s, m)]  # W after its I


def play(order: dict[int, list[_Action]], num_stages: int, costs: Costs) -> Timeline:
    """Run every rank's actions in its order, each as early as its dependencies allow (no communication time)."""
    cost = {"F": costs.F, "B": costs.B, "I": costs.B - costs.W, "W": costs.W, "F&B": costs.FB}
    done: dict[tuple[str, int, int], float] = {}
    clock = dict.fromkeys(order, 0.0)
    busy = dict.fromkeys(order, 0.0)
    nxt = dict.fromkeys(order, 0)
    slots = []
    moved = True
    while moved:
        moved = False
        for rank, actions in order.items():
            while nxt[rank] < len(actions):
                action = actions[nxt[rank]]
                parts = action.sub_actions if action.computation_type == _ComputationType.OVERLAP_F_B else [action]
                needs = [k for part in parts for k in _needs(part, num_stages)]
                if any(k not in done for k in needs):
                    break
                start = max([clock[rank]] + [done[k] for k in needs])
                kind = _KINDS[action.computation_type]
                clock[rank] = start + cost[kind]
                busy[rank] += cost[kind]
                for part in parts:
                    done[_key(part)] = clock[rank]
                slots.append(Slot(rank, start, clock[rank], kind,
                                  tuple((p.stage_index, p.microbatch_index) for p in parts)))
                nxt[rank] += 1
                moved = True
    stuck = {r: str(order[r][nxt[r]]) for r in order if nxt[r] < len(order[r])}
    if stuck:
        raise RuntimeError(f"the action lists wait on each other forever (first blocked action per rank: {stuck})")
    length = max(clock.values())
    return Timeline(slots, length, {r: length - busy[r] for r in order}, _peak_activations(slots, order))


def _peak_activations(slots: list[Slot], order) -> dict[int, int]:
    peak = {}
    for rank in order:
        events = []  # (time, +1 at a forward's start, -1 at the end of the backward that frees it)
        split = {w for s in slots if s.rank == rank and s.kind == "W" for w in s.work}
        for s in slots:
            if s.rank != rank:
                continue
            if s.kind in ("F", "F&B"):
                events.append((s.start, 1))
            frees = [w for w in s.work[1 if s.kind == "F&B" else 0:]
                     if (s.kind == "W") or (s.kind in ("B", "F&B") and w not in split)]
            events += [(s.end, -1)] * len(frees)
        level = top = 0
        for _, step in sorted(events, key=lambda e: (e[0], e[1])):
            level += step
            top = max(top, level)
        peak[rank] = top
    return peak


def table2_bubble(schedule: str, pp: int, costs: Costs) -> float:
    """The report's Table 2 bubble for this schedule on pp ranks (DualPipeV: DualPipe's with PP = 2 pp)."""
    c = costs
    if schedule == "1f1b":
        return (pp - 1) * (c.F + c.B)
    if schedule == "zb1p":
        return (pp - 1) * (c.F + c.B - 2 * c.W)
    if schedule == "dualpipev":
        return (2 * pp / 2 - 1) * (c.FB + c.B - 3 * c.W)
    raise ValueError(f"schedule: Table 2 gives 1f1b, zb1p and DualPipe (dualpipev), found {schedule!r}")
