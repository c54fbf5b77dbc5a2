"""The launch, planned by running it: one rank of a parallel DeepSeek-V3 on fake tensors.

`simulate(cfg, world_size=8, rank=0, ...)` runs, on rank `rank` of torch's fake process group (a world
of any size inside this process, whose collectives move nothing), the code a torchrun launch runs:

1. loading as `dsv3ref.parallel.from_pretrained` loads, on the release's headers (`Headers.of_release`):
   the model built on the meta device, cut by `parallelize`, this rank's part allocated; nothing is read;
2. `model.new_cache(rows, seq_len)`;
3. the last prefill pass (`dsv3ref.prefill.prefill`: the pass whose queries see the most keys), the
   cache holding the earlier passes' positions;
4. one decode step, as `generate` makes it;

all under torch's `FakeTensorMode` (tensors with shapes, dtypes and devices but no data) on a
simulated H100/H200 (device "cpu", SM90, CUDA 12.9, so that the device-dependent choices are the
GPU's: torch's blockwise scaled_mm, grouped_mm). A dispatch mode (`SimulationMode`) counts the bytes
of every tensor on the device while it lives, so the result is the peak the code reaches, not a
formula: `dsv3ref.plan` is checked against it.

What has no value under fake tensors is made up, and said here:

- **routing**: the router's scores have no values, so experts are chosen by `balanced_choice`
  (`dsv3ref.routing.override`): every expert gets the same load, within the group limit, as the
  auxiliary-loss-free bias aims for;
- **the other ranks** are assumed to hold what this rank holds (a symmetric world), which fixes what
  a collective returns (an all-reduce of x: world * x; an all-gather: world copies of x). For the
  expert exchange (all-to-all), rank s is this rank rotated: its tokens choose the experts this
  rank's tokens choose, moved (s - rank) ranks on, so it sends this rank what this rank sends rank
  2 * rank - s (the expert ids among it moved on), and every rank receives as many rows as it sends;
- the integers the code reads back to the host (positions, token counts per expert and per rank) are
  computed for real on the CPU from those: every small integer or boolean tensor carries its value.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from dsv3ref import checkpoint, experts, fp8, routing
from dsv3ref.checkpoint import Headers, load_pretrained
from dsv3ref.config import ModelConfig
from dsv3ref.impl import AUTO, Implementation
from dsv3ref.model import DeepseekV3
from dsv3ref.parallel.plan import Parallel, parallelize
from dsv3ref.prefill import DEFAULT_PREFILL_CHUNK, chunk_width, prefill

VALUE_LIMIT = 1 << 20
"""Integer and boolean tensors up to this many elements carry their values (positions, expert ids,
counts); larger ones (attention masks) and every floating tensor have shapes only."""
COLLECTIVES = "_c10d_functional"
COUNTED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")
"""The collectives whose inputs are counted (wait_tensor and the like move nothing)."""


class SimulationError(RuntimeError):
    """The simulated code needed a value that fake tensors do not have: the message names the operation."""


def balanced_choice(cfg: ModelConfig) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A router choice with every expert equally loaded: token t takes its k experts from topk_group
    groups spread over the n_group groups (t, t + n_group / topk_group, ...), slot j in group j mod
    topk_group, and within a group the next expert of a rotation, so that over n_group * group-size
    tokens each expert is chosen equally often. For `dsv3ref.routing.override`."""
    groups = cfg.n_group if cfg.topk_method == "noaux_tc" or cfg.topk_method == "group_limited_greedy" else 1
    eligible = cfg.topk_group if groups > 1 else 1
    per_group, k = cfg.n_routed_experts // groups, cfg.num_experts_per_tok
    per_slot_group = -(-k // eligible)  # experts a token takes from one group

    def choose(layer: int, scores: torch.Tensor) -> torch.Tensor:
        t = torch.arange(scores.shape[0], device=scores.device)[:, None]  # (n, 1)
        slot = torch.arange(k, device=scores.device)[None]  # (1, k)
        group = (t + (slot % eligible) * (groups // eligible)) % groups  # (n, k)
        within = ((t // groups) * per_slot_group + slot // eligible) % per_group
        return group * per_group + within

    return choose


@dataclass
class _Phase:
    start: int
    peak: int
    collectives: dict[str, int] = field(default_factory=dict)


class SimulationMode(TorchDispatchMode):
    """Counts the bytes of the tensors alive on `device`, with their peak, and the bytes handed to
    each collective; carries the values of small integer tensors (see the module docstring). Used
    inside a FakeTensorMode."""

    def __init__(self, device: str, world: int, rank: int, experts_per_rank: int = 0):
        super().__init__()
        self.device, self.world, self.rank = torch.device(device).type, world, rank
        self.experts_per_rank = experts_per_rank
        self.values = WeakIdKeyDictionary()  # fake tensor -> its value (a CPU tensor)
        self.counted = WeakIdKeyDictionary()  # storages counted as alive
        self.live = self.peak = 0
        self.phases: dict[str, _Phase] = {}
        self.current: _Phase | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[_Phase]:
        """Record the peak of live bytes and the collectives inside the block, as phases[name]."""
        outer = self.current
        self.current = self.phases[name] = _Phase(self.live, self.live)
        try:
            yield self.current
        finally:
            self.current = outer

    # ------------------------------------------------------------------------------- bytes alive
    def _count(self, t: torch.Tensor) -> None:
        if t.device.type != self.device:
            return
        storage = t.untyped_storage()
        if storage in self.counted:
            return
        n = storage.nbytes()
        self.counted[storage] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        if self.current is not None:
            self.current.peak = max(self.current.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    # ------------------------------------------------------------------------------------ values
    def _known(self, x) -> bool:
        return not isinstance(x, FakeTensor) or x in self.values

    def _value(self, x):
        if isinstance(x, FakeTensor):
            return self.values[x]
        if isinstance(x, torch.device):
            return torch.device("cpu")  # values live on the CPU
        return x

    def _symmetric(self, func, args):
        """A collective's result on values, in a world where every rank holds this rank's."""
        name = func.__name__.split(".")[0]
        x = self.values[args[0]]
        if name == "all_reduce":
            return x * self.world
        if name == "all_gather_into_tensor":
            return torch.cat([x] * self.world)
        if name == "reduce_scatter_tensor":
            return x.chunk(self.world)[self.rank] * self.world
        if name == "all_to_all_single":
            # rank s routes as this rank does with every expert moved (s - rank) ranks on: it sends this
            # rank what this rank sends rank 2 * rank - s, its expert ids (the int32 payload) moved on
            blocks, out = x.split(args[2]), []
            for s in range(self.world):
                block = blocks[(2 * self.rank - s) % self.world]
                if block.dtype == torch.int32 and self.experts_per_rank:
                    n = self.world * self.experts_per_rank
                    moved = (block + (s - self.rank) * self.experts_per_rank) % n
                    block = torch.where(block >= 0, moved, block)
                out.append(block)
            return torch.cat(out)
        if name == "wait_tensor":
            return x
        raise SimulationError(f"{func}: no symmetric value for this collective")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        inputs = [a for a in flat if isinstance(a, torch.Tensor)]
        known = all(self._known(a) for a in inputs)
        collective = func.namespace == COLLECTIVES
        name = func.__name__.split(".")[0]
        if collective and self.current is not None and name in COUNTED:
            self.current.collectives[name] = self.current.collectives.get(name, 0) + args[0].nbytes
        if func is torch.ops.aten._scaled_mm_v2.default:
            # torch 2.13's shape check for blockwise scales wants N // 128 scale columns, where the CUDA
            # kernel takes ceil(N / 128) (kv_a_proj_with_mqa: N = 576): the output's shape, without it.
            out = torch.empty(args[0].shape[0], args[1].shape[1], dtype=args[9], device=args[0].device)
            self._count(out)
            return out
        if func is torch.ops.aten._local_scalar_dense.default:
            if not known:
                raise SimulationError(f"{func}: the code read back a value computed from weights or activations")
            with _disable_current_modes():
                return self.values[args[0]].item()
        try:
            out = self._collective(name, args) if collective else func(*args, **kwargs)
            dynamic = False
        except (DynamicOutputShapeException, DataDependentOutputException):
            if not known:
                raise SimulationError(f"{func}: its output's shape depends on values fake tensors do not "
                                      "have") from None
            dynamic = True
        value = None
        if known and (dynamic or inputs or self._small(out)):
            with _disable_current_modes():
                if collective:
                    value = self._symmetric(func, args)
                else:
                    value = func(*tree_map(self._value, args), **tree_map(self._value, kwargs))
        if dynamic:  # the shape comes from the values: make fake tensors like them
            device = next(a.device for a in inputs if isinstance(a, FakeTensor))
            out = tree_map(lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device)
                           if isinstance(v, torch.Tensor) else v, value)
        if value is not None:
            for o, v in zip(tree_flatten(out)[0], tree_flatten(value)[0], strict=False):
                if isinstance(o, FakeTensor) and isinstance(v, torch.Tensor) and self._small(v):
                    self.values[o] = v
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                self._count(o)
        return out

    def _collective(self, name: str, args) -> torch.Tensor:
        """A collective's output, from its input's shape: nothing is sent, and nothing is left in flight
        on the process group (torch's fake tensors would run the collective for real on fake data)."""
        x = args[0]
        if name == "wait_tensor":
            return x
        if name == "all_reduce":
            shape = x.shape
        elif name == "all_gather_into_tensor":
            shape = (x.shape[0] * self.world, *x.shape[1:])
        elif name == "reduce_scatter_tensor":
            shape = (x.shape[0] // self.world, *x.shape[1:])
        elif name == "all_to_all_single":
            shape = (sum(args[1]), *x.shape[1:]) if args[1] else x.shape
        else:
            raise SimulationError(f"{name}: a collective the simulation does not know")
        return torch.empty(shape, dtype=x.dtype, device=x.device)

    @staticmethod
    def _small(x) -> bool:
        tensors = [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]
        return bool(tensors) and all(not t.is_floating_point() and t.numel() <= VALUE_LIMIT for t in tensors)


@contextmanager
def simulated_gpu() -> Iterator[None]:
    """The device-dependent choices of the code answered as on an H100/H200 (SM90, CUDA >= 12.9): torch's
    blockwise scaled_mm runs there (dsv3ref.fp8.scaled_mm_recipe), so fp8_kernel "auto" takes it and the
    FP8 layers call it; grouped_mm takes bf16 only (dsv3ref.experts.grouped_mm_supported), and the
    grouped experts take all assignments in one run (dsv3ref.experts.default_block_rows). The fake
    tensors themselves live on the CPU device (torch's CPU build cannot index fake CUDA tensors);
    everything else the code does is the same on both."""
    def recipe(device) -> str:
        return "blockwise"

    def grouped(x: torch.Tensor, w: torch.Tensor) -> bool:
        return experts.grouped_mm_supported("cuda", x.dtype, (9, 0))

    with mock.patch.object(fp8, "scaled_mm_recipe", recipe), \
            mock.patch.object(checkpoint, "scaled_mm_recipe", recipe), \
            mock.patch.object(experts, "_can_use_grouped_mm", grouped), \
            mock.patch.object(experts, "default_block_rows", lambda device_type: None):
        yield


@contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[dist.ProcessGroup]:
    """Torch's fake process group as the default group of this process, for the duration of the block."""
    if dist.is_initialized():
        raise SimulationError("simulate: this process already has a process group; run the simulation in a process "
                              "of its own (python -m dsv3ref plan --simulate)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Simulation:
    """What one rank of a launch holds on its GPU, counted while the code runs (bytes)."""

    world_size: int
    rank: int
    parallel: Parallel
    impl: Implementation
    dtype: torch.dtype
    batch_size: int
    rows: int
    """This rank's batch rows (all of them under layout "tp", its share under "dp")."""
    seq_len: int
    prefill_chunk: int
    mtp: bool
    weights: int
    """Alive after loading: the weights and what the model keeps beside them (none read)."""
    cache: int
    """The latent (or naive) cache of `rows` rows of `seq_len` positions."""
    prefill: int
    """The most alive during the last prefill pass, above weights and cache."""
    decode: int
    """The same for one decode step."""
    peak: int
    """The most alive at any moment."""
    collectives: dict[str, dict[str, int]]
    """Bytes handed to each collective (input sizes) in the prefill pass and the decode step."""

    @property
    def activations(self) -> int:
        return max(self.prefill, self.decode)


def simulate(cfg: ModelConfig, world_size: int = 8, rank: int = 0, parallel: Parallel | None = None, *,
             dtype: torch.dtype = torch.bfloat16, gemm_impl: str = AUTO, attn_impl: str = "absorb",
             batch_size: int = 32, seq_len: int = 4096, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
             mtp: bool = False) -> Simulation:
    """Run the launch's code for rank `rank` of `world_size` on fake tensors (see the module docstring).

    cfg: the model (the release's layout: FP8 projections when cfg has a quantization_config);
    gemm_impl, attn_impl, dtype: as a launch takes them ("auto": decided as loading decides on an SM90
    GPU); batch_size prompts of seq_len positions of cache, prefilled prefill_chunk tokens a pass.
    """
    parallel = parallel or Parallel()
    for name, value in (("world_size", world_size), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive integer, found {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, found {rank!r}")
    rows = batch_size if parallel.layout == "tp" else math.ceil(batch_size / world_size)
    width = chunk_width(rows, prefill_chunk)
    headers = Headers.of_release(cfg)
    with fake_world(world_size, rank) as group, simulated_gpu(), ExitStack() as fake:
        sim = SimulationMode("cpu", world_size, rank, cfg.n_routed_experts // world_size)

        def plan_then_fake(model):
            """parallel.from_pretrained's plan; then fake tensors from the allocation on (the model is
            built on the meta device and cast before, which torch cannot do to fake parameters)."""
            shards = parallelize(model, group, parallel)
            fake.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            fake.enter_context(sim)
            fake.enter_context(sim.phase("load"))
            return shards

        model = load_pretrained(DeepseekV3, headers, dtype=dtype, device="cpu", attn_impl=attn_impl,
                                moe_impl=AUTO, gemm_impl=gemm_impl, fp8_kernel=AUTO, mtp=mtp,
                                check_finite_values=False, progress=False, parallelize=plan_then_fake)
        weights = sim.live
        cache = model.new_cache(rows, seq_len)
        cache_bytes = sim.live - weights
        start = max(0, seq_len - width)
        with torch.no_grad(), routing.override(model, balanced_choice(cfg)):
            cache.filled.fill_(start)  # the passes before the last one wrote positions 0 .. start - 1
            ids = torch.zeros(rows, seq_len - start, dtype=torch.long, device="cpu")
            head = model.lm_head
            with sim.phase("prefill"):  # generate keeps each row's last hidden state and reads its logits
                prefill(model.hidden_states, ids, cache, prefill_chunk, start=start,
                        keep=lambda p0, hidden: head(hidden[:, -1]))
            positions = torch.full((rows,), seq_len - 1, dtype=torch.long, device="cpu")
            with sim.phase("decode"):
                model(ids[:, :1], cache, positions)
        impl = model.impl
    base = weights + cache_bytes
    return Simulation(world_size=world_size, rank=rank, parallel=parallel, impl=impl, dtype=dtype,
                      batch_size=batch_size, rows=rows, seq_len=seq_len, prefill_chunk=prefill_chunk,
                      mtp=mtp, weights=weights, cache=cache_bytes, prefill=sim.phases["prefill"].peak - base,
                      decode=sim.phases["decode"].peak - base, peak=sim.peak,
                      collectives={p: dict(sim.phases[p].collectives) for p in ("prefill", "decode")})
