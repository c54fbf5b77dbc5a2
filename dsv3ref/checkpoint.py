"""Reading and writing checkpoints in the published Hugging Face layout.

A checkpoint folder holds `config.json` and either one `model.safetensors` or several shards listed
by `model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`). Tensor names are the
parameter names of `DeepseekV3` (`model.layers.3.mlp.experts.17.gate_proj.weight`, ...).

Only safetensors and JSON are read: nothing is unpickled and no code from a checkpoint is run.
Every file is written under a temporary name and renamed into place once complete, so an
interrupted save never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3ref.config import ModelConfig

if TYPE_CHECKING:
    from dsv3ref.model import DeepseekV3

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file and tensor."""


# ---------------------------------------------------------------------------------------- writing
def _atomic_replace(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to path; remove the temporary file on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically."""
    _atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def save_pretrained(model: DeepseekV3, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` to folder `path` as config.json + safetensors, in the published layout.

    Tensors are kept in the model's dtype. One `model.safetensors` is written if everything fits in
    `max_shard_bytes`; otherwise numbered shards and `model.safetensors.index.json`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"save_pretrained: {path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    for copy, main in _mtp_copies(model.config).items():
        state[copy] = state[main].clone()  # the published layout stores these copies; engines read them
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the same tensor as model.embed_tokens.weight
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    old_index = path / INDEX_FILE
    old_shards = set()
    if old_index.is_file():
        old_shards = set(json.loads(old_index.read_text()).get("weight_map", {}).values())
    if len(shards) == 1:
        atomic_save_tensors(path / SINGLE_FILE, shards[0])
        new_files = {SINGLE_FILE}
        if old_index.is_file():
            old_index.unlink()  # it would take precedence over the new single file
    else:
        weight_map = {}
        total = len(shards)
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{total:05d}.safetensors"
            atomic_save_tensors(path / fname, shard)
            weight_map.update(dict.fromkeys(shard, fname))
        total_size = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        atomic_write_text(old_index, json.dumps(index, indent=2, sort_keys=True) + "\n")
        new_files = set(weight_map.values())
    for stale in old_shards - new_files:
        (path / stale).unlink(missing_ok=True)
    model.config.save(path)


# ---------------------------------------------------------------------------------------- reading
def tensor_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name of the checkpoint in folder `path` to the safetensors file holding it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: expected a checkpoint folder (config.json + safetensors), found a file")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({e!r})") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which is not in {path}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise CheckpointError(f"{path}: expected {SINGLE_FILE} or {INDEX_FILE}; found "
                          f"{found if found else 'no safetensors files'}")


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """Checkpoint names of the MTP modules' copies of the embedding and head -> the main tensor."""
    copies = {}
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        copies[prefix + "embed_tokens.weight"] = "model.embed_tokens.weight"
        copies[prefix + "shared_head.head.weight"] = ("model.embed_tokens.weight" if cfg.tie_word_embeddings
                                                     else "lm_head.weight")
    return copies


GEMM_IMPLS = ("bf16", "fp8")
_SCALE = "_scale_inv"  # "x.weight" + _SCALE = "x.weight_scale_inv"


def _check_fp8_config(cfg: ModelConfig, path: Path) -> str | None:
    """The FP8 layout config.json declares; returns the scale format (None or "ue8m0")."""
    qc = cfg.quantization_config or {}
    expected = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    for key, value in expected.items():
        if qc.get(key) != value:
            raise CheckpointError(f"{path / 'config.json'}: the checkpoint stores FP8 block scales, so "
                                  f"quantization_config.{key} must be {value!r}; found {qc.get(key)!r}")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(f"{path / 'config.json'}: quantization_config.activation_scheme: found "
                              f"{qc.get('activation_scheme')!r}, expected 'dynamic'")
    return qc.get("scale_fmt", cfg.extra.get("scale_fmt"))


def load_pretrained(cls, path, *, dtype, device, attn_impl, moe_impl, gemm_impl="bf16",
                    fp8_kernel="emulate") -> DeepseekV3:
    """Build `cls(config)` on `device` in `dtype` and fill it from the checkpoint in `path`.

    MTP modules: config.json's num_nextn_predict_layers decides how many are read (from
    `model.layers.{num_hidden_layers + k}`); a checkpoint that stores none loads with MTP off
    (num_nextn_predict_layers = 0); their copies of the embedding and head must equal the main ones.

    FP8 checkpoints (`quantization_config.quant_method: fp8`): every `*.weight` stored in E4M3 comes
    with its `*.weight_scale_inv`. gemm_impl "bf16" dequantizes them on load (to `dtype`);
    "fp8" keeps them in FP8 and runs those layers as `FP8Linear` (block-scaled FP8 GEMM) with
    `fp8_kernel` "emulate" (exact, any device) or "scaled_mm" (torch's scaled_mm; CPU or SM90 GPU).
    """
    from dsv3ref.fp8 import FP8_KERNELS, FP8Linear, dequantize_weight, scaled_mm_recipe

    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype such as torch.float32, found {dtype!r}")
    if gemm_impl not in GEMM_IMPLS:
        raise ValueError(f"gemm_impl: found {gemm_impl!r}, expected one of {GEMM_IMPLS}")
    if fp8_kernel not in FP8_KERNELS:
        raise ValueError(f"fp8_kernel: found {fp8_kernel!r}, expected one of {FP8_KERNELS}")
    if fp8_kernel != "emulate" and gemm_impl != "fp8":
        raise ValueError(f"fp8_kernel={fp8_kernel!r} chooses how FP8 weights are multiplied: it needs gemm_impl='fp8'")
    if fp8_kernel == "scaled_mm" and scaled_mm_recipe(device) is None:
        raise ValueError(f"fp8_kernel='scaled_mm': torch {torch.__version__} offers no block-scaled scaled_mm on "
                         f"device {device} (a CPU, or an SM90 GPU with CUDA >= 12.9); use fp8_kernel='emulate'")
    path = Path(path)
    files = tensor_files(path)
    cfg = ModelConfig.from_pretrained(path)
    n_main, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    layer_ids = {int(m.group(1)) for m in map(_LAYER.match, files) if m}
    notes = []
    if n_mtp and not layer_ids & set(range(n_main, n_main + n_mtp)):
        notes.append(f"config.json asks for {n_mtp} MTP module(s) but the checkpoint stores none: MTP is off")
        n_mtp = 0
    fp8_weights = {name[: -len(_SCALE)] for name in files if name.endswith(".weight" + _SCALE)}
    scale_fmt = _check_fp8_config(cfg, path) if fp8_weights else None
    for name in sorted(fp8_weights):
        if name not in files:
            raise CheckpointError(f"{files[name + _SCALE]}: block scale {name + _SCALE} has no weight {name}")
    if gemm_impl == "fp8" and not fp8_weights:
        raise ValueError(f"gemm_impl='fp8': {path} stores no FP8 weights (no *.weight_scale_inv tensors)")
    if gemm_impl == "fp8" and moe_impl != "loop":
        raise ValueError("gemm_impl='fp8' runs the experts as separate FP8 layers: use moe_impl='loop'")
    cfg = cfg.replace(num_nextn_predict_layers=n_mtp,
                      quantization_config=cfg.quantization_config if gemm_impl == "fp8" else None)

    with torch.device("meta"):
        model = cls(cfg, attn_impl=attn_impl, moe_impl=moe_impl)
        model = model.to(dtype=dtype)
        if gemm_impl == "fp8":  # after the cast, which would turn FP8 buffers into `dtype`
            for name in fp8_weights:
                parent, _, child = name.removesuffix(".weight").rpartition(".")
                owner = model.get_submodule(parent)
                linear = getattr(owner, child)
                fp8_linear = FP8Linear(linear.in_features, linear.out_features, scale_fmt, kernel=fp8_kernel)
                setattr(owner, child, fp8_linear)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    targets = model.state_dict()
    if cfg.tie_word_embeddings:
        del targets["lm_head.weight"]  # the embedding, loaded under its own name
    copies = _mtp_copies(cfg)

    by_file: dict[Path, list[str]] = {}
    unused: list[str] = []
    for name, file in files.items():
        if name in targets or name in copies or (gemm_impl == "bf16" and name.removesuffix(_SCALE) in fp8_weights):
            by_file.setdefault(file, []).append(name)
            continue
        m = _LAYER.match(name)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            raise CheckpointError(f"{file}: stores lm_head.weight although config.json sets "
                                  "tie_word_embeddings=true (the head is the embedding)")
        if m and int(m.group(1)) >= n_main + n_mtp:
            unused.append(name)  # an MTP module beyond num_nextn_predict_layers (or MTP switched off)
        else:
            raise CheckpointError(f"{file}: unexpected tensor {name} (not a DeepSeek-V3 parameter for this "
                                  f"config.json; {len(targets)} parameters expected)")

    loaded = set()
    copy_values = {}
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in names:
                    sl = f.get_slice(name)
                    shape, kind = tuple(sl.get_shape()), sl.get_dtype()
                    if name.endswith(_SCALE):
                        continue  # read with its weight
                    want = tuple(targets[copies.get(name, name)].shape)
                    if shape != want:
                        raise CheckpointError(f"{file}: tensor {name} has shape {shape}, expected {want} "
                                              f"from config.json")
                    allowed = _FLOAT_DTYPES | ({"F8_E4M3"} if name in fp8_weights else set())
                    if kind not in allowed:
                        hint = " (an FP8 weight needs its weight_scale_inv)" if kind.startswith("F8") else ""
                        raise CheckpointError(f"{file}: tensor {name} has dtype {kind}, expected one of "
                                              f"{sorted(allowed)}{hint}")
                    value = f.get_tensor(name)
                    if name in fp8_weights:
                        scale = _read_scale(files, name, shape)
                        if gemm_impl == "fp8":
                            targets[name + _SCALE].copy_(scale)
                            loaded.add(name + _SCALE)
                        else:
                            value = dequantize_weight(value, scale, dtype=dtype)
                    if name in copies:
                        copy_values[name] = (file, value)
                    else:
                        targets[name].copy_(value)
                        loaded.add(name)
        missing = sorted(set(targets) - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(f"{path}: missing tensor(s) {shown}")
        for name, (file, value) in copy_values.items():
            main = targets[copies[name]]
            if not torch.equal(value.to(main.dtype), main):
                raise CheckpointError(f"{file}: tensor {name} differs from {copies[name]}; dsv3ref shares the main "
                                      "model's embedding and head with the MTP modules, as the report does")
    model.unused_tensors = sorted(unused)
    model.load_notes = notes
    model.gemm_impl = gemm_impl
    return model.eval()


def _read_scale(files: dict[str, Path], weight: str, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """The weight_scale_inv of an FP8 weight, checked: float32-compatible, block-shaped, finite, positive."""
    name = weight + _SCALE
    file = files[name]
    with safe_open(file, framework="pt", device="cpu") as f:
        scale = f.get_tensor(name)
    expected = tuple(-(-d // 128) for d in weight_shape)
    if tuple(scale.shape) != expected:
        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(scale.shape)}, expected {expected} "
                              f"(one scale per 128 x 128 block of {weight}, shape {weight_shape})")
    if not scale.is_floating_point() or not torch.isfinite(scale).all() or not (scale > 0).all():
        raise CheckpointError(f"{file}: tensor {name} must hold finite positive float scales")
    return scale.float()
