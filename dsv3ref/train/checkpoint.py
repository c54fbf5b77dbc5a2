"""A training run's checkpoints: written whole or not at all, read back only after every part is checked.

A checkpoint is a folder `step_NNNNNN/` holding

- the model in the published format (`config.json` + safetensors: `DeepseekV3.from_pretrained` reads it),
- `optimizer.safetensors`: AdamW's moments, `NAME.exp_avg` and `NAME.exp_avg_sq` per parameter,
- `train_state.json`: `{"step": int, "adam_steps": {NAME: int}, "config": the run's TrainConfig}`.

Writing: the folder is built under a temporary name beside its final one and renamed into place
(`dsv3ref.atomic.atomic_folder`), so a killed run leaves either the whole checkpoint or none (a
leftover temporary folder is removed by the next run in that folder). Weights and moments are
checked finite first: a checkpoint of NaN weights is never written.

Reading (`load_checkpoint`): the resume is refused, with the file and the field or tensor named, if
`train_state.json` is not what `save_checkpoint` writes (an integer step >= 0, known parameter names,
Adam step counts in 1..step), if config.json describes another model than the run's, if a moment is
missing, of another shape or dtype, not finite, or (second moments) negative, and, through
`check_resume`, if the run's configuration changes what the uninterrupted run would have computed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dsv3ref.atomic import atomic_folder, atomic_save_tensors, atomic_write_text
from dsv3ref.checkpoint import CheckpointError, check_finite, open_safetensors, read_tensor, save_pretrained
from dsv3ref.config import ModelConfig
from dsv3ref.model import DeepseekV3

if TYPE_CHECKING:
    from dsv3ref.train.loop import TrainConfig

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")

TRAJECTORY_FIELDS = ("seed", "steps", "batch_size", "seq_len", "lr", "min_lr", "warmup", "weight_decay", "grad_clip",
                     "mtp_lambda", "mtp_lambda_late", "mtp_switch", "balance", "gamma", "gamma_late", "gamma_switch",
                     "aux_alpha", "seq_alpha",
                     "fp8", "fp8_kernel", "max_corpus_bytes", "model", "dtype", "attn_impl")
"""TrainConfig fields that change what a run computes after a resume (`steps` too: the cosine schedule
ends at it). The others (out_dir, eval_every, eval_batches, save_every, progress, device) change
where results go, what is measured on the side, or the hardware, not the weights."""


def step_folder(out_dir: Path, step: int) -> Path:
    """Where the checkpoint after `step` optimizer steps lives."""
    return out_dir / f"step_{step:06d}"


def save_checkpoint(folder: Path, model: DeepseekV3, optimizer: torch.optim.AdamW, step: int,
                    cfg: TrainConfig) -> None:
    """Write the checkpoint after `step` steps to `folder`, which must not exist (a checkpoint is never
    overwritten). FloatingPointError, before anything is written, if a weight or a moment is not finite."""
    folder = Path(folder)
    names = {id(p): n for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            raise FloatingPointError(f"step {step}: parameter {name} is not finite; no checkpoint written")
    tensors, adam_steps = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                for moment in MOMENTS:
                    value = state[moment].detach().to("cpu").contiguous()
                    if not bool(torch.isfinite(value).all()):
                        raise FloatingPointError(f"step {step}: AdamW's {moment} of {names[id(p)]} is not finite; "
                                                 "no checkpoint written")
                    tensors[f"{names[id(p)]}.{moment}"] = value
                adam_steps[names[id(p)]] = int(state["step"])

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp)
        atomic_save_tensors(tmp / OPTIMIZER_FILE, tensors)
        atomic_write_text(tmp / STATE_FILE, json.dumps(
            {"step": step, "adam_steps": adam_steps, "config": dataclasses.asdict(cfg)}, indent=1) + "\n")
    atomic_folder(folder, write)  # FileExistsError if the folder exists: a checkpoint is never overwritten


def _whole(value: object) -> bool:
    """An integer, or a float holding one (JSON writers may give 3.0), never a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value == int(value))


def read_train_state(folder: Path) -> dict:
    """train_state.json of a checkpoint folder, checked to be what save_checkpoint writes (the names
    in adam_steps are checked against the model by load_checkpoint); CheckpointError naming the file
    and the field."""
    file = Path(folder) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a training checkpoint (no {STATE_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot be read as JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(state).__name__}")
    step = state.get("step")
    if not _whole(step) or step < 0:
        raise CheckpointError(f"{file}: field step: expected an integer >= 0, found {step!r}")
    adam = state.get("adam_steps")
    if not isinstance(adam, dict):
        raise CheckpointError(f"{file}: field adam_steps: expected an object {{parameter: step count}}, found "
                              f"{type(adam).__name__}")
    for name, count in adam.items():
        if not _whole(count) or not 1 <= count <= step:
            raise CheckpointError(f"{file}: field adam_steps.{name}: expected an integer in 1..{step} (the "
                                  f"checkpoint's step), found {count!r}")
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{file}: field config: expected an object (the run's TrainConfig), found "
                              f"{type(state.get('config')).__name__}")
    return {"step": int(step), "adam_steps": {n: int(c) for n, c in adam.items()}, "config": state["config"]}


def check_resume(saved: dict, cfg: TrainConfig, file: Path, allow_changes: tuple[str, ...] = ()) -> list[str]:
    """Compare the configuration a checkpoint was written with against the resumed run's. A field of
    TRAJECTORY_FIELDS that differs raises ValueError naming it, the saved and the given value, unless
    it is in allow_changes; returns one line per allowed change, to be said on screen."""
    unknown = sorted(set(allow_changes) - set(TRAJECTORY_FIELDS))
    if unknown:
        raise ValueError(f"allow_changes: {unknown} are not fields that change a run's trajectory; expected some of "
                         f"{list(TRAJECTORY_FIELDS)}")
    given = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    notes = []
    for name in TRAJECTORY_FIELDS:
        # a checkpoint written before a field existed ran as its default does
        old, new = saved.get(name, defaults[name] if name in defaults else "<absent>"), given[name]
        if old == new or (isinstance(old, list) and tuple(old) == new):
            continue
        if name in allow_changes:
            notes.append(f"resume: {name} changed from {old!r} (saved in {file}) to {new!r}, as allowed; the run "
                         "no longer continues the saved run's trajectory exactly")
            continue
        raise ValueError(f"resume: {name} was {old!r} in {file}, this run gives {new!r}; a resumed run continues "
                         f"exactly only with the saved value (to change it on purpose: --allow-change {name} on the "
                         f"command line, allow_changes=('{name}',) in train())")
    return notes


def _check_model_config(folder: Path, model: DeepseekV3) -> None:
    saved = ModelConfig.from_pretrained(folder)
    ours = model.config
    diffs = [f"{f.name} {getattr(saved, f.name)!r} (this run: {getattr(ours, f.name)!r})"
             for f in dataclasses.fields(ModelConfig) if getattr(saved, f.name) != getattr(ours, f.name)]
    if diffs:
        raise CheckpointError(f"{folder / 'config.json'}: describes another model than this run's: "
                              + "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else ""))


def load_checkpoint(folder: Path, model: DeepseekV3, optimizer: torch.optim.AdamW, cfg: TrainConfig,
                    allow_changes: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Restore a save_checkpoint folder into the run's model and optimizer, every part checked first.
    Returns (the step to continue from, lines to say on screen about allowed configuration changes)."""
    folder = Path(folder)
    params = dict(model.named_parameters())
    state = read_train_state(folder)
    if cfg.steps <= state["step"]:
        raise ValueError(f"steps: {cfg.steps}, but the checkpoint {folder} is already at step {state['step']}; give "
                         f"more steps than that to continue it")
    notes = check_resume(state["config"], cfg, folder / STATE_FILE, allow_changes)
    _check_model_config(folder, model)
    unknown = sorted(set(state["adam_steps"]) - set(params))
    if unknown:
        raise CheckpointError(f"{folder / STATE_FILE}: field adam_steps names {unknown[0]!r}, which is not a parameter "
                              "of this run's model")
    weights = DeepseekV3.from_pretrained(folder).state_dict()  # checks every tensor's shape and finiteness
    missing = model.load_state_dict(weights, strict=False)
    if missing.missing_keys:
        raise CheckpointError(f"{folder}: checkpoint lacks {missing.missing_keys[:3]} of this run's model")
    file = folder / OPTIMIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder}: not a training checkpoint (no {OPTIMIZER_FILE})")
    expected = {f"{name}.{m}" for name in state["adam_steps"] for m in MOMENTS}
    moments = {}
    with open_safetensors(file) as f:
        extra = sorted(set(f.keys()) - expected)
        if extra:
            raise CheckpointError(f"{file}: holds {extra[:3]}, which {STATE_FILE}'s adam_steps does not list")
        for key in sorted(expected):
            if key not in f.keys():
                raise CheckpointError(f"{file}: lacks {key} (listed by {STATE_FILE}'s adam_steps)")
            value = read_tensor(f, file, key)
            p = params[key.rsplit(".", 1)[0]]
            if value.shape != p.shape or value.dtype != p.dtype:
                raise CheckpointError(f"{file}: tensor {key} is {tuple(value.shape)} {value.dtype}, expected "
                                      f"{tuple(p.shape)} {p.dtype} (its parameter's)")
            check_finite(value, file, key)
            if key.endswith(".exp_avg_sq") and bool((value < 0).any()):
                raise CheckpointError(f"{file}: tensor {key} holds negative values; a second moment is >= 0")
            moments[key] = value
    optimizer.state.clear()
    for name, count in state["adam_steps"].items():
        p = params[name]
        optimizer.state[p] = {"step": torch.tensor(float(count)),
                              **{m: moments[f"{name}.{m}"].to(p.device).clone() for m in MOMENTS}}
    return state["step"], notes
