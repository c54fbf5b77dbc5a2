"""Checkpoints of a distributed run: one safetensors file per rank, written as one folder or not at all.

A checkpoint is a folder `step_NNNNNN/` holding

- `rank_RRRRR.safetensors` for every rank: `param/NAME` for each parameter of its stages (the model's
  names, so experts keep their global index), `buffer/NAME` for its routers' biases, and its share of
  AdamW's state (`adam/NAME/exp_avg`, `adam/NAME/exp_avg_sq`, `adam/NAME/step`) for the parameters
  whose optimizer state it holds (ZeRO-1);
- `train_state.json`: `{"step", "layout", "world_size", "config"}`.

Our own safetensors layout rather than `torch.distributed.checkpoint`, whose metadata file is a
pickle: dsv3ref never unpickles what it reads. All ranks write into one temporary folder, then rank 0
renames it into place after a barrier, so a run killed mid-write leaves no `step_NNNNNN/` (the next run
removes the temporary folder). Resuming needs the same layout and the same training settings
(`dsv3ref.train.checkpoint.check_resume`); every tensor is checked by name, shape and dtype.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3ref.atomic import TMP_SUFFIX
from dsv3ref.checkpoint import CheckpointError, save_pretrained
from dsv3ref.parallel.launch import agree
from dsv3ref.train.checkpoint import STATE_FILE, check_resume, step_folder
from dsv3ref.train.loop import TrainConfig, build_model

if TYPE_CHECKING:
    from dsv3ref.train.distributed.trainer import DistributedRun


def on_rank_zero(action, what: str):
    """Run action() on rank 0 and tell every rank whether it failed (`dsv3ref.parallel.launch.agree`, a
    collective): the other ranks raise too, instead of waiting at the next collective for a rank that
    has stopped. Returns action()'s result on rank 0, None elsewhere."""
    result, failure = None, None
    if dist.get_rank() == 0:
        try:
            result = action()
        except Exception as e:  # told to every rank by agree, which raises
            failure = e
    agree(what, failure, waited=f"{what}: a rank did not answer in time")
    return result


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.safetensors"


def _optimizer_states(run: DistributedRun):
    """(name, parameter, its AdamW state) for every parameter whose state this rank holds."""
    for opt in run.optimizers:
        if opt is None:
            continue
        for group in opt.optim.param_groups:
            for p in group["params"]:
                yield run.names[id(p)], p, opt.optim.state[p]


def _tensors(run: DistributedRun) -> dict[str, torch.Tensor]:
    tensors = {f"param/{run.names[id(p)]}": p.detach() for p in run.params}
    for i, router in run.routers.items():
        tensors[f"buffer/model.layers.{i}.mlp.gate.e_score_correction_bias"] = router.e_score_correction_bias
    for name, _, state in _optimizer_states(run):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                tensors[f"adam/{name}/{key}"] = torch.as_tensor(state[key]).reshape(-1).clone()
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def save_distributed_checkpoint(out_dir: Path, step: int, run: DistributedRun) -> Path:
    """Write the checkpoint after `step` steps (collective: every rank calls it); returns its folder."""
    folder = step_folder(out_dir, step)
    tmp = folder.parent / f".{folder.name}.partial{TMP_SUFFIX}"  # removed by the next run if this one dies

    def prepare() -> None:
        if folder.exists():
            raise FileExistsError(f"{folder}: exists; a checkpoint is never overwritten")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    on_rank_zero(prepare, f"preparing {tmp}")
    failure = None
    try:
        save_file(_tensors(run), rank_file(tmp, run.rank), metadata={"format": "pt"})
    except Exception as e:  # a full disk on one rank: every rank stops (agree), none waits for it
        failure = e
    agree(f"writing {folder}", failure, waited=f"writing {folder}: a rank did not answer in time")
    if run.rank == 0:
        state = {"step": step, "layout": dataclasses.asdict(run.layout), "world_size": run.layout.world_size,
                 "config": dataclasses.asdict(run.cfg)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        tmp.rename(folder)
    dist.barrier()
    return folder


def load_distributed_checkpoint(folder: Path, run: DistributedRun) -> int:
    """Restore this rank's part of a checkpoint into the run; returns the step to continue from.
    CheckpointError naming the file and the tensor or field that does not fit."""
    state_file = folder / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_file}: cannot read the run's state ({e})") from None
    layout = dataclasses.asdict(run.layout)
    if state.get("layout") != layout:
        raise CheckpointError(f"{state_file}: written with layout {state.get('layout')}, this run has {layout}; "
                              "a distributed checkpoint resumes on the same layout")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= run.cfg.steps:
        raise CheckpointError(f"{state_file}: step: expected an integer in 0..{run.cfg.steps}, found {step!r}")
    check_resume(state.get("config", {}), run.cfg, state_file)
    file = rank_file(folder, run.rank)
    expected = {k: v for k, v in _tensors(run).items() if not k.startswith("adam/")}
    shapes = {name: p for name, p, _ in _optimizer_states(run)}
    try:
        f = safe_open(file, framework="pt")
    except Exception as e:  # OSError, or safetensors' own error for a damaged header
        raise CheckpointError(f"{file}: cannot read rank {run.rank}'s part of the checkpoint ({e})") from None
    found = set(f.keys())
    adam = {k for k in found if k.startswith("adam/")}
    stray = sorted(k for k in adam if k.rsplit("/", 1)[0][len("adam/"):] not in shapes)
    missing = sorted(set(expected) - found)
    unexpected = sorted(found - set(expected) - adam) + stray
    if missing or unexpected:
        raise CheckpointError(f"{file}: holds other tensors than rank {run.rank}'s part of this run (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
    loaded = {}
    for key in sorted(found):
        tensor = f.get_tensor(key)
        if key in expected:
            like = expected[key]
        else:
            name, part = key[len("adam/"):].rsplit("/", 1)
            p = shapes[name]
            like = torch.empty(1, dtype=torch.float32) if part == "step" else p.detach().reshape(-1)
        if tensor.shape != like.shape or tensor.dtype != like.dtype:
            raise CheckpointError(f"{file}: {key}: expected {like.dtype} {tuple(like.shape)}, found "
                                  f"{tensor.dtype} {tuple(tensor.shape)}")
        loaded[key] = tensor
    by_name = {run.names[id(p)]: p for p in run.params}
    with torch.no_grad():
        for name, p in by_name.items():
            p.copy_(loaded[f"param/{name}"])
        for i, router in run.routers.items():
            router.e_score_correction_bias.copy_(loaded[f"buffer/model.layers.{i}.mlp.gate.e_score_correction_bias"])
    for name, p, state in _optimizer_states(run):
        parts = [f"adam/{name}/{k}" for k in ("exp_avg", "exp_avg_sq", "step")]
        if any(k in loaded for k in parts) and not all(k in loaded for k in parts):
            raise CheckpointError(f"{file}: AdamW state of {name} is incomplete (expected {parts})")
        if parts[2] in loaded:
            state["step"] = loaded[f"adam/{name}/step"].reshape(())
            state["exp_avg"] = loaded[f"adam/{name}/exp_avg"].view_as(p).to(p.device).clone()
            state["exp_avg_sq"] = loaded[f"adam/{name}/exp_avg_sq"].view_as(p).to(p.device).clone()
    return step


def gather_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every parameter and router bias of a distributed checkpoint, by the model's names, read from all the
    rank files (no process group needed). A tensor that several ranks hold (replicas over ep and dp, the
    embedding's copy) must be bit-identical on all of them, else CheckpointError naming it and the ranks."""
    folder = Path(folder)
    files = sorted(folder.glob("rank_*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no rank_*.safetensors files (not a distributed checkpoint)")
    weights: dict[str, torch.Tensor] = {}
    first_seen: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                kind, _, name = key.partition("/")
                if kind not in ("param", "buffer"):
                    continue
                tensor = f.get_tensor(key)
                if name in weights and not torch.equal(weights[name], tensor):
                    raise CheckpointError(f"{name}: differs between {first_seen[name].name} and {file.name} "
                                          "(replicas of a tensor must stay identical)")
                weights.setdefault(name, tensor)
                first_seen.setdefault(name, file)
    return weights


def export_pretrained(folder: Path, out: Path) -> Path:
    """Write a distributed checkpoint's model in the published format (`DeepseekV3.from_pretrained` reads
    it): the run's model rebuilt from train_state.json, its weights gathered (`gather_weights`), every
    parameter and bias required."""
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    model = build_model(TrainConfig(**{**state["config"], "progress": False}))
    weights = gather_weights(folder)
    expected = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers()
                                                 if n.endswith("e_score_correction_bias")}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"{folder}: the rank files hold no {missing[:3]} (a checkpoint of another run?)")
    with torch.no_grad():
        for name, target in expected.items():
            if weights[name].shape != target.shape:
                raise CheckpointError(f"{folder}: {name}: expected shape {tuple(target.shape)}, found "
                                      f"{tuple(weights[name].shape)}")
            target.copy_(weights[name])
    save_pretrained(model, out)
    return Path(out)
