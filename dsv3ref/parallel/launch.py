"""Process groups for a torchrun launch, what a launch checks before and after loading, and
generation with data-parallel attention.

`torchrun --nproc-per-node N -m dsv3ref generate ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (on several nodes: `--nnodes`, `--node-rank` and a
rendezvous endpoint, as torchrun documents). `init_from_env` joins them into one process group:
NCCL on CUDA (one GPU per local rank), gloo on the CPU, with a timeout on every collective, so a
rank that dies makes the others fail with an error instead of waiting for ever.

A launch (dsv3ref.cli) then goes: `check_memory` (the plan of this launch against the memory the
device has, before anything is allocated), `agree` (every rank's verdict exchanged: one rank that
cannot go on stops them all, with its reason), loading, `agree` again (the barrier after loading, on
the world group whose timeout is the generous load timeout), and generation on a group of its own
with the shorter generation timeout (`generation_group`). `describe_failure` tells what went wrong:
out of memory, a compilation, or a collective.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3ref.config import ModelConfig
from dsv3ref.generate import Generation, generate
from dsv3ref.impl import Implementation
from dsv3ref.model import DeepseekV3
from dsv3ref.parallel.plan import Parallel
from dsv3ref.parallel.planner import GIB, RESERVE_BYTES, MemoryPlan, plan

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_LOAD_TIMEOUT_S = 3600.0
"""Loading the released checkpoint reads about 85 GB per rank: a slow disk takes many minutes."""


class LaunchError(RuntimeError):
    """A launch that cannot go on: the message says which variable, rank, or how much memory.
    quiet: every rank knows the same message, and rank 0 says it (the others exit without repeating it)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or anything that sets its variables)."""
    return "WORLD_SIZE" in os.environ or "RANK" in os.environ


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes; returns (rank, world size, this rank's device).

    device: "cuda" or "cpu" (default: cuda when available). Each collective fails after timeout_s.
    """
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise LaunchError(f"torchrun's environment is incomplete: {', '.join(missing)} not set; launch with "
                          "`torchrun --nproc-per-node N -m dsv3ref ...` (or set all of "
                          f"{', '.join(TORCHRUN_VARIABLES)})")
    try:
        rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise LaunchError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, found {os.environ['RANK']!r}, "
                          f"{os.environ['WORLD_SIZE']!r}, {os.environ['LOCAL_RANK']!r}") from None
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if local >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK={local}, but this node has {torch.cuda.device_count()} GPU(s): start "
                              "at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
        this = torch.device("cuda", local)
    else:
        this = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, this


def generation_group(timeout_s: float) -> dist.ProcessGroup:
    """All ranks again, as a group whose collectives fail after timeout_s (the world group keeps the
    load timeout it was made with). Every rank must call it, before loading."""
    return dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))


def agree(what: str, failure: BaseException | None, waited: str) -> None:
    """Every rank tells the others whether `what` went well (an exchange over the world group, which
    is also a barrier). If any rank failed, every rank raises LaunchError with the reasons (a rank's
    own error other than a LaunchError or ValueError is re-raised as it is: a bug keeps its traceback).
    waited: what it means when the exchange itself times out or loses a rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    reason = None if failure is None else str(failure) or type(failure).__name__
    reasons: list = [None] * world
    try:
        dist.all_gather_object(reasons, reason)
    except (RuntimeError, dist.DistError) as e:
        raise LaunchError(f"rank {rank}: {waited} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                          ) from None
    if failure is not None and not isinstance(failure, (LaunchError, ValueError, TypeError, OSError)):
        raise failure
    failed = [(r, text) for r, text in enumerate(reasons) if text is not None]
    if not failed:
        return
    if len({text for _, text in failed}) == 1 and len(failed) == world:
        raise LaunchError(failed[0][1], quiet=rank != 0)
    raise LaunchError(f"{what} failed on {len(failed)} of {world} ranks: " +
                      "; ".join(f"rank {r}: {text}" for r, text in failed), quiet=rank != 0)


IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
"""The files of a checkpoint folder whose per-node copies every rank must agree on before computing."""


def checkpoint_identity(path: Path) -> dict[str, object]:
    """What a rank read of a checkpoint folder's small files: config.json's fields (parsed, so that
    formatting does not matter) and a sha256 of each tokenizer file ("absent" if there is none)."""
    identity: dict[str, object] = {}
    for name in IDENTITY_FILES:
        file = path / name
        if not file.is_file():
            identity[name] = "absent"
        elif name == "config.json":
            identity[name] = json.loads(file.read_text())
        else:
            identity[name] = hashlib.sha256(file.read_bytes()).hexdigest()
    return identity


def _difference(mine: object, theirs: object) -> str:
    if isinstance(mine, dict) and isinstance(theirs, dict):
        keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k, "<absent>") != theirs.get(k, "<absent>"))
        return "; ".join(f"{k} {theirs.get(k, '<absent>')!r} against {mine.get(k, '<absent>')!r}" for k in keys[:4])
    return f"sha256 {str(theirs)[:12]} against {str(mine)[:12]}"


def agree_on_files(identity: dict[str, object], where: Path | str) -> None:
    """Every rank's `identity` (file name -> what it read) compared with rank 0's over the world group:
    ranks that read different copies of a file (per-node copies that differ) would compute different
    things, so each rank raises LaunchError naming the first rank and file that differ from rank 0
    (rank 0 says it, the others exit quietly)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, identity)
    reference = gathered[0]
    for other in range(1, world):
        for name, value in gathered[other].items():
            if value != reference.get(name):
                raise LaunchError(f"rank {other} and rank 0 read different {name} of {where} (per-node copies that "
                                  f"differ?): {_difference(reference.get(name), value)} (rank {other}'s value "
                                  "first); every rank must read the same checkpoint", quiet=rank != 0)


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes this process may use on `device`, how that was found, in words): a GPU's free memory; on
    a CPU, the memory Linux reports available divided among this node's processes (LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} has {free / GIB:.1f} GiB free"
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        total = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 2**62, "its available memory is unknown"
    share = total // processes
    per = f" for each of its {processes} processes" if processes > 1 else ""
    return share, f"this machine has {share / GIB:.1f} GiB available{per}"


def _gib(n: float) -> str:
    """Bytes in GiB, with the digits a small plan needs (85.1, 0.0462)."""
    value = n / GIB
    if value >= 10 or value == 0:
        return f"{value:.1f}"
    return f"{value:.3g}" if value >= 0.001 else "<0.001"


def check_memory(cfg: ModelConfig, world: int, parallel: Parallel, impl: Implementation, dtype: torch.dtype, *,
                 batch_size: int, seq_len: int, prefill_chunk: int, mtp: bool, device: torch.device,
                 available: int, where: str, stores_fp8: bool) -> MemoryPlan:
    """The plan of this launch (`dsv3ref.plan`); LaunchError, before anything is allocated, if it needs
    more than `available` bytes per rank, naming what would fit instead."""
    reserve = RESERVE_BYTES if device.type == "cuda" else 0

    def plan_for(**changes) -> MemoryPlan:
        setting = dict(world_size=world, layout=parallel.layout, gemm_impl=impl.gemm_impl, dtype=dtype,
                       prefill_chunk=prefill_chunk)
        setting.update(changes)
        return plan(cfg, setting["world_size"], setting["layout"], setting["gemm_impl"], available / GIB,
                    batch_size, seq_len, setting["prefill_chunk"], mtp, dtype=setting["dtype"],
                    attn_impl=impl.attn_impl, moe_comm=parallel.moe_comm, reserve=reserve)

    needed = plan_for()
    if needed.fits:
        return needed
    unit = "GPU" if device.type == "cuda" else "process"
    instead = []
    if impl.gemm_impl == "bf16" and stores_fp8:
        instead.append(("--gemm-impl fp8", plan_for(gemm_impl="fp8")))
    if dtype.itemsize > 2:
        instead.append(("--dtype bfloat16", plan_for(dtype=torch.bfloat16)))
    if parallel.layout == "dp":
        instead.append(("--layout tp", plan_for(layout="tp")))
    chunk = prefill_chunk // 2
    while chunk >= 128 and not plan_for(prefill_chunk=chunk).fits:
        chunk //= 2
    if chunk >= 128:
        instead.append((f"--prefill-chunk {chunk}", plan_for(prefill_chunk=chunk)))
    for bigger in (world * 2**i for i in range(1, 8)):
        try:
            candidate = plan_for(world_size=bigger)
        except ValueError:
            continue
        if candidate.fits:
            instead.append((f"a world size of {bigger} (torchrun --nproc-per-node, --nnodes)", candidate))
            break
    fitting = [f"{flag} would need {_gib(p.used)} GiB" for flag, p in instead if p.fits]
    raise LaunchError(
        f"this launch needs {_gib(needed.used)} GiB per {unit} (weights {_gib(needed.weights)}, "
        f"derived {_gib(needed.derived)}, cache {_gib(needed.cache)}, activations "
        f"{_gib(needed.activations)}, reserve {_gib(needed.reserve)}; world size {world}, "
        f"{impl.gemm_impl} GEMMs, {str(dtype).removeprefix('torch.')}), and {where}: "
        + ("; ".join(fitting) if fitting else "no world size up to 128x this one, no dtype and no prefill chunk "
           "fits") + " (or --max-memory-gib to allow more)")


def describe_failure(e: BaseException) -> tuple[str, int] | None:
    """What went wrong, in words, and the exit status, for the failures a launch can meet (None: a bug,
    to be shown with its traceback): out of memory, torch.compile, a collective that failed or timed out."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f"rank {dist.get_rank()}: " if dist.is_initialized() else ""
    if isinstance(e, torch.OutOfMemoryError):
        return (f"{where}out of memory ({first}); `python -m dsv3ref plan` shows what a launch needs: a smaller "
                "--prefill-chunk, --batch rows or more GPUs need less", 2)
    if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return f"{where}torch.compile failed ({type(e).__name__}: {first}); run without --compile", 2
    text = str(e)
    if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and dist.is_initialized() and any(
            mark in text for mark in ("Gloo", "gloo", "NCCL", "Connection closed by peer", "Timed out", "timed out"))):
        return (f"{where}a collective failed (another rank exited, or --timeout passed): {first}", 3)
    return None


def generate_data_parallel(model: DeepseekV3, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                           eos_token_id: int | Sequence[int] | None = None, **kwargs) -> Generation:
    """Greedy or sampled generation with data-parallel attention (layout "dp"): the prompts are dealt
    out in contiguous blocks, each rank decodes its own rows with its own cache, and every rank
    returns every prompt's tokens.

    All ranks must call the model equally often (each MoE layer exchanges tokens), so every rank
    decodes the same number of rows (a rank with fewer prompts adds copies, and discards them),
    padded to the longest prompt of all ranks (so that all prefill in the same number of chunks), for
    max_new_tokens steps, and cuts its rows after their end token. With sampling, the seed is per rank: tokens
    follow the same distribution as a single process's, not the same draw.
    """
    state = model.parallel
    if state is None or state.parallel.layout != "dp":
        raise ValueError("generate_data_parallel: the model is not split with layout='dp' (dsv3ref.parallel.Parallel)")
    if kwargs.get("speculative"):
        raise ValueError("speculative: not available with layout='dp' (each rank would call the model a different "
                         "number of times); use layout='tp'")
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts: no prompts given")
    blocks = [range(len(prompts))[part] for part in _blocks(len(prompts), state.world_size)]
    mine = blocks[state.rank]
    rows = [prompts[i] for i in mine] or [prompts[0]]
    # Every rank decodes as many rows, padded to one length, so that all make the same passes
    # (prefill chunks included): the extra rows are copies, discarded below.
    rows += [rows[0]] * (len(blocks[0]) - len(rows))
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    out = generate(model, rows, max_new_tokens, eos_token_id=[], pad_to=max(map(len, prompts)), **kwargs)
    tokens, finished = [], []
    for seq in out.tokens[: len(mine)]:
        end = next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))
        tokens.append(seq[:end])
        finished.append(end < len(seq) or (bool(seq) and seq[-1] in eos))
    gathered: list = [None] * state.world_size
    dist.all_gather_object(gathered, (tokens, finished), group=state.group)
    all_tokens = [t for part, _ in gathered for t in part]
    all_finished = [f for _, part in gathered for f in part]
    return Generation(prompts=prompts, tokens=all_tokens, finished=all_finished, stats=out.stats)


def _blocks(n: int, world: int) -> list[slice]:
    """n items in `world` contiguous blocks, as even as possible (the first blocks one longer)."""
    per, extra = divmod(n, world)
    starts = [r * per + min(r, extra) for r in range(world + 1)]
    return [slice(starts[r], starts[r + 1]) for r in range(world)]
