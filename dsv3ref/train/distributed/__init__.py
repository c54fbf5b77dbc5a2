"""Training across processes, the report's way (section 3.2), on torch's own engine.

- `layout`: pp x ep x dp ranks and their process groups (expert parallelism folded into data
  parallelism, as in the report);
- `stages`: the model cut into pipeline stages for `torch.distributed.pipelining` (GPipe, 1F1B, ZBV,
  DualPipeV), the embedding and the head on rank 0 in the V-shaped schedules;
- `experts`: each rank's share of the routed experts, reached through autograd-aware all-to-alls;
- `trainer`: the step (schedule, gradient sums, global clip, ZeRO-1 AdamW, bias from the global load)
  and `train_distributed`;
- `checkpoint`: one safetensors file per rank, the folder written whole;
- `timeline`: the schedules' own action lists played out with costs F, B, W: timelines, bubbles and
  activation memory against the report's Table 2.

Launch: `torchrun --nproc-per-node N -m dsv3ref train --pp P --ep E --dp D --schedule dualpipev`.
"""

from dsv3ref.train.distributed.layout import SCHEDULES, Layout
from dsv3ref.train.distributed.trainer import DistributedRun, train_distributed

__all__ = ["SCHEDULES", "DistributedRun", "Layout", "train_distributed"]
