"""Process groups for a torchrun launch, and generation with data-parallel attention.

`torchrun --nproc-per-node N -m dsv3ref generate ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (on several nodes: `--nnodes`, `--node-rank` and a
rendezvous endpoint, as torchrun documents). `init_from_env` joins them into one process group:
NCCL on CUDA (one GPU per local rank), gloo on the CPU, with a timeout on every collective, so a
rank that dies makes the others fail with an error instead of waiting for ever.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dsv3ref.generate import Generation, generate
from dsv3ref.model import DeepseekV3

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0


class LaunchError(RuntimeError):
    """A launch that cannot form a process group: the message says which variable or rank."""


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


def generate_data_parallel(model: DeepseekV3, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                           eos_token_id: int | Sequence[int] | None = None, **kwargs) -> Generation:
    """Greedy or sampled generation with data-parallel attention (layout "dp"): the prompts are dealt
    out in contiguous blocks, each rank decodes its own rows with its own cache, and every rank
    returns every prompt's tokens.

    All ranks must call the model equally often (each MoE layer exchanges tokens), so every rank
    decodes max_new_tokens steps and cuts its rows after their end token; a rank with no prompt
    decodes a copy of the first one and discards it. With sampling, the seed is per rank: tokens
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
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    out = generate(model, rows, max_new_tokens, eos_token_id=[], **kwargs)
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
