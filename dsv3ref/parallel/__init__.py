"""Scale-out: DeepSeek-V3 across processes and GPUs on torch.distributed.

- `plan`: the parallel plan (`Parallel`, `parallelize`) and the sharded loader (`from_pretrained`);
- `layers`: column-, row- and vocabulary-parallel pieces; `moe`: expert parallelism (all-reduce
  and all-to-all);
- `planner`: per-GPU memory for a configuration, a world size and a layout (`plan_memory`);
- `launch`: process groups from torchrun's environment, with a timeout on every collective.

The model never imports this package: parallelism is applied to it from outside.
"""

from dsv3ref.parallel.layers import ParallelError
from dsv3ref.parallel.plan import Parallel, ParallelState, from_pretrained, parallelize, parameter_bytes

__all__ = ["Parallel", "ParallelError", "ParallelState", "from_pretrained", "parallelize", "parameter_bytes"]
