"""Scale-out: DeepSeek-V3 across processes and GPUs on torch.distributed.

- `plan`: the parallel plan (`Parallel`, `parallelize`) and the sharded loader (`from_pretrained`);
- `layers`: column-, row- and vocabulary-parallel pieces; `moe`: expert parallelism (all-reduce
  and all-to-all);
- `comm`: the collectives, torch's functional collectives with autograd rules;
- `planner`: per-GPU memory for a configuration, a world size and a layout (`dsv3ref.plan`);
- `simulation`: the launch run on fake tensors at any size, counting each rank's bytes (`simulate`);
- `launch`: process groups from torchrun's environment, the memory check before loading, failures
  told apart, data-parallel generation.

The model never imports this package: parallelism is applied to it from outside.
"""

from dsv3ref.parallel.layers import ParallelError
from dsv3ref.parallel.plan import Parallel, ParallelState, from_pretrained, parallelize, parameter_bytes

__all__ = ["Parallel", "ParallelError", "ParallelState", "from_pretrained", "parallelize", "parameter_bytes",
           "simulate"]


def simulate(*args, **kwargs):
    """`dsv3ref.parallel.simulation.simulate`: one rank of a launch run on fake tensors (imported on
    first use: it brings in torch's fake tensors and fake process group)."""
    from dsv3ref.parallel.simulation import simulate as run

    return run(*args, **kwargs)
