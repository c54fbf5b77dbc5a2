"""Reading and writing checkpoints in the published Hugging Face layout.

A checkpoint folder holds `config.json` and either one `model.safetensors` or several shards listed
by `model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`). Tensor names are the
parameter names of `DeepseekV3` (`model.layers.3.mlp.experts.17.gate_proj.weight`, ...).

Only safetensors and JSON are read: nothing is unpickled and no code from a checkpoint is run.
Every file is written under a temporary name and renamed into place once complete, so an
interrupted save never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsv3ref.atomic import DATA_ALIGNMENT, atomic_save_tensors, atomic_write_text, is_plain_name
from dsv3ref.block import DecoderLayer
from dsv3ref.config import ModelConfig
from dsv3ref.fp8 import (
    BLOCK,
    E4M3,
    E4M3_MAX,
    QUANTIZATION_CONFIG,
    SCALE_SUFFIX,
    FP8Linear,
    auto_kernel,
    dequantize_weight_fast,
    replace_fp8_layers,
    scaled_mm_recipe,
)
from dsv3ref.impl import AUTO, CHOICES, Implementation, check_request
from dsv3ref.mtp import MTPLayer, checkpoint_copies

if TYPE_CHECKING:
    from dsv3ref.model import DeepseekV3

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
GEMM_IMPLS = CHOICES["gemm_impl"]  # the vocabulary's values (dsv3ref.impl)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file and tensor."""


# ---------------------------------------------------------------------------------------- writing
def _old_shards(index: Path) -> set[str]:
    """The shard files a previous save listed in `index`: plain file names only (an index may come
    from anywhere; a name with a folder part, "..", or an absolute path is never the save's to remove)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return set()
    if not isinstance(weight_map, dict):
        return set()
    return {name for name in weight_map.values() if is_plain_name(name) and name.endswith(".safetensors")}


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
    for copy, main in checkpoint_copies(model.config).items():
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
    old_shards = _old_shards(old_index) if old_index.is_file() else set()
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
        old_shards.add(SINGLE_FILE)  # a previous single-file save of this folder, now shadowed by the index
    for stale in sorted(old_shards - new_files):
        stale_path = path / stale
        if stale_path.is_file() or stale_path.is_symlink():
            stale_path.unlink()
    model.config.save(path)


# ---------------------------------------------------------------------------------------- reading
def _inside(name: object) -> bool:
    """Whether an index entry names a file inside the checkpoint folder (relative, no "..")."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and p.name not in ("", ".")


def tensor_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name of the checkpoint in folder `path` to the safetensors file holding it.

    An index may only name files inside the folder (a subfolder is fine, "..", absolute paths are
    not); the files themselves may be symbolic links, as in the Hugging Face cache.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: expected a checkpoint folder (config.json + safetensors), found a file")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must be an object {{tensor name: shard file}}, found "
                                  f"{type(weight_map).__name__}")
        for name, fname in weight_map.items():
            if not _inside(fname):
                raise CheckpointError(f"{index}: tensor {name} is listed in {fname!r}, which is not a file inside "
                                      f"{path}; shards must be in the checkpoint folder")
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{index}: lists shard {f.relative_to(path)}, which is not in {path}")
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.relative_to(path)} in {path} is not a file")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise CheckpointError(f"{path}: expected {SINGLE_FILE} or {INDEX_FILE}; found "
                          f"{found if found else 'no safetensors files'}")


@contextmanager
def open_safetensors(file: Path) -> Iterator:
    """`safe_open(file)` (header read and checked, data mapped), with errors that name the file."""
    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError, or an OSError
        raise CheckpointError(f"{file}: cannot be read as safetensors ({type(e).__name__}: {e})") from None
    with handle as f:
        yield f


def read_tensor(f, file: Path, name: str) -> torch.Tensor:
    """One tensor of an open safetensors file, with an error that names the file and the tensor."""
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{file}: tensor {name} cannot be read ({type(e).__name__}: {e})") from None


def check_finite(value: torch.Tensor, file: Path, name: str) -> None:
    """Raise CheckpointError if a weight holds NaN or Inf (for FP8 bytes: E4M3's NaN codes 0x7f/0xff).

    A streaming reduction rules them out first (about 20x faster than an elementwise check): NaN
    and Inf reach any sum, so a finite sum means every element is finite; E4M3's NaN codes are the
    largest byte (0xff, unsigned) and the largest signed byte (0x7f). Only a tensor that fails
    this (or a sum that overflowed) is checked element by element.
    """
    if value.numel() == 0:
        return
    if value.dtype == torch.float8_e4m3fn:
        u = value.view(torch.uint8)
        if int(u.max()) != 0xFF and int(u.view(torch.int8).max()) != 0x7F:
            return
        bad = (u & 0x7F) == 0x7F
    elif value.is_floating_point():
        if bool(torch.isfinite(value.sum())):
            return
        bad = ~torch.isfinite(value)
    else:
        return
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(f"{file}: tensor {name} holds {int(bad.sum())} non-finite value(s) (NaN or Inf), the "
                              f"first at index {first}; a model loaded from it would compute NaN "
                              "(check_finite=False skips this check)")


def _span(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]} ({len(ids)})" if ids else "none"


def check_layout(cfg: ModelConfig, names, config_file: Path, n_mtp: int) -> None:
    """Compare the layer and expert counts of config.json with the tensor names a checkpoint stores,
    before a model of the config's size is built (a config asking for 5000 layers fails here, at once)."""
    stored_layers: set[int] = set()
    experts: dict[int, set[int]] = {}
    for name in names:
        if m := _LAYER.match(name):
            stored_layers.add(int(m.group(1)))
        if m := _EXPERT.match(name):
            experts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    n_main = cfg.num_hidden_layers
    main = sorted(i for i in stored_layers if i < n_main)
    if len(main) != n_main:
        raise CheckpointError(f"{config_file}: num_hidden_layers={n_main}, but the checkpoint stores layers "
                              f"{_span(sorted(stored_layers))}")
    for layer in range(n_main + n_mtp):
        if cfg.is_moe_layer(layer):
            found = sorted(experts.get(layer, ()))
            if len(found) != cfg.n_routed_experts or (found and found[-1] != len(found) - 1):
                raise CheckpointError(f"{config_file}: n_routed_experts={cfg.n_routed_experts}, but "
                                      f"model.layers.{layer}.mlp stores experts {_span(found)}")


@dataclass(frozen=True)
class LoadReport:
    """What `from_pretrained` found, kept on the model as `model.load_report`."""

    path: Path
    """The checkpoint folder."""
    unused_tensors: tuple[str, ...]
    """Tensors of the checkpoint that the model does not use (MTP modules beyond
    num_nextn_predict_layers, or all of them when the checkpoint's config switches MTP off)."""
    notes: tuple[str, ...]
    """Decisions taken while loading, in words (e.g. MTP switched off for lack of its weights)."""
    bytes_read: int = 0
    """Bytes of tensor data read from the files (with a parallel plan: this process's parts only)."""
    headers_sha256: str = ""
    """A digest of the name, shape and dtype of every tensor the model takes from the checkpoint (every
    process of a parallel load reads all headers): equal on processes that read equal checkpoints."""
    files_opened: int = 0
    """safetensors files opened: each at most once (headers, tensors and block scales through one handle)."""


def headers_digest(headers: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """sha256 over the sorted (name, shape, dtype) triples of a checkpoint's headers."""
    text = "\n".join(f"{name} {list(shape)} {kind}" for name, (shape, kind) in sorted(headers.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_fp8_config(cfg: ModelConfig, path: Path) -> str | None:
    """The FP8 layout config.json declares; returns the scale format (None or "ue8m0")."""
    qc = cfg.quantization_config or {}
    for key in ("quant_method", "fmt", "weight_block_size"):
        if qc.get(key) != QUANTIZATION_CONFIG[key]:
            raise CheckpointError(f"{path / 'config.json'}: the checkpoint stores FP8 block scales, so "
                                  f"quantization_config.{key} must be {QUANTIZATION_CONFIG[key]!r}; "
                                  f"found {qc.get(key)!r}")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(f"{path / 'config.json'}: quantization_config.activation_scheme: found "
                              f"{qc.get('activation_scheme')!r}, expected 'dynamic'")
    scale_fmt = qc.get("scale_fmt", cfg.extra.get("scale_fmt"))
    if scale_fmt not in (None, "ue8m0"):
        raise CheckpointError(f"{path / 'config.json'}: scale_fmt: found {scale_fmt!r}, expected 'ue8m0' or none")
    return scale_fmt


@dataclass(frozen=True)
class Shard:
    """The part of a stored tensor that one process holds: indices [start, stop) along `dim`.

    Made by a parallel plan (dsv3ref.parallel) for every tensor it splits; the loader reads just
    this part from the file (`safe_open(...).get_slice`), never the whole tensor. An FP8 weight's
    block scales are sliced on the same 128-block grid.
    """

    dim: int
    start: int
    stop: int

    def index(self, ndim: int) -> tuple[slice, ...]:
        """The slices that cut this part out of a tensor with ndim dimensions."""
        return tuple(slice(self.start, self.stop) if d == self.dim else slice(None) for d in range(ndim))

    def blocks(self, block: int = BLOCK) -> Shard:
        """The part of the block-scale grid covering this part: block rows (or columns) start // block
        to ceil(stop / block)."""
        return Shard(self.dim, self.start // block, -(-self.stop // block))


Parallelize = Callable[["DeepseekV3"], dict[str, Shard]]
"""A parallel plan applied to the model built on the meta device: it cuts the model down to this
process's part and returns the Shard of every tensor it split (tensors it dropped, such as other
ranks' experts, are not read)."""


@dataclass(frozen=True)
class Headers:
    """A checkpoint described by its tensors' names, shapes and dtypes, without their data: what
    `load_pretrained` reads from the safetensors headers before it allocates anything.

    `load_pretrained(cls, Headers(...))` runs the whole load up to and including the allocation of
    the model (on any device, the meta device or fake tensors included) and reads no data: the launch,
    planned (dsv3ref.parallel.simulation). `Headers.of_release(cfg)` is the published layout of a config:
    the tensors `save_pretrained` writes, the FP8 projections with their block scales when the config
    has a quantization_config (as DeepSeek-V3's release stores them).
    """

    config: ModelConfig
    tensors: dict[str, tuple[tuple[int, ...], str]]
    """name -> (shape, safetensors dtype: "BF16", "F32", "F8_E4M3", ...)."""
    label: str = "headers"

    @classmethod
    def of_release(cls, cfg: ModelConfig) -> Headers:
        """The published layout of `cfg` (every layer, MTP modules and their copies of embedding and head)."""
        kinds = {torch.bfloat16: "BF16", torch.float32: "F32", E4M3: "F8_E4M3"}
        impl = Implementation(gemm_impl="fp8" if cfg.quantization_config is not None else "bf16")
        v, d = cfg.vocab_size, cfg.hidden_size
        tensors: dict[str, tuple[tuple[int, ...], str]] = {"model.embed_tokens.weight": ((v, d), "BF16"),
                                                           "model.norm.weight": ((d,), "BF16")}
        if not cfg.tie_word_embeddings:
            tensors["lm_head.weight"] = ((v, d), "BF16")
        n = cfg.num_hidden_layers
        templates: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}  # one layer of each kind, built once
        for i in range(n + cfg.num_nextn_predict_layers):
            kind = "mtp" if i >= n else "moe" if cfg.is_moe_layer(i) else "dense"
            if kind not in templates:
                with torch.device("meta"):
                    layer = (MTPLayer if kind == "mtp" else DecoderLayer)(cfg, i, impl)
                    if impl.gemm_impl == "fp8":
                        replace_fp8_layers(layer, lambda lin: FP8Linear(lin.in_features, lin.out_features),
                                           prefix=f"model.layers.{i}.")
                    layer = layer.to(torch.bfloat16)
                templates[kind] = {name: (tuple(t.shape), kinds[t.dtype]) for name, t in layer.state_dict().items()}
            tensors.update({f"model.layers.{i}.{name}": value for name, value in templates[kind].items()})
        for copy, main in checkpoint_copies(cfg).items():
            tensors[copy] = tensors[main]
        return cls(cfg, tensors, label=f"the published layout of a {cfg.num_hidden_layers}-layer config")


def resolve_implementation(stores_fp8: bool, device: str | torch.device, *, attn_impl: str = "naive",
                           attn_order: str = "auto", moe_impl: str = "loop", gemm_impl: str = "bf16",
                           fp8_kernel: str = AUTO) -> Implementation:
    """The Implementation a load asks for, with "auto" decided (see dsv3ref.impl): gemm_impl "fp8" when
    the checkpoint stores FP8 weights; fp8_kernel "scaled_mm" where the device runs torch's blockwise
    scaled_mm; moe_impl "loop" for FP8 weights, "grouped" otherwise."""
    for field, value in (("moe_impl", moe_impl), ("gemm_impl", gemm_impl), ("fp8_kernel", fp8_kernel)):
        check_request(field, value)
    if gemm_impl == AUTO:
        gemm_impl = "fp8" if stores_fp8 else "bf16"
    if fp8_kernel == AUTO:
        fp8_kernel = auto_kernel(device) if gemm_impl == "fp8" else "emulate"
    if moe_impl == AUTO:
        moe_impl = "loop" if gemm_impl == "fp8" else "grouped"
    return Implementation(attn_impl=attn_impl, attn_order=attn_order, moe_impl=moe_impl, gemm_impl=gemm_impl,
                          fp8_kernel=fp8_kernel)


def resolve_dtype(dtype: torch.dtype | str, device: str | torch.device) -> torch.dtype:
    """dtype "auto": bfloat16 on CUDA (DeepSeek's inference dtype), float32 elsewhere."""
    if dtype == AUTO:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype such as torch.float32 (or 'auto'), found {dtype!r}")
    return dtype


def stores_fp8(source: str | Path | Headers) -> bool:
    """Whether a checkpoint folder (or Headers) stores FP8 weights (tensors named *.weight_scale_inv)."""
    names = source.tensors if isinstance(source, Headers) else tensor_files(source)
    return any(name.endswith(".weight" + SCALE_SUFFIX) for name in names)


def load_pretrained(cls, source: str | Path | Headers, *, dtype: torch.dtype | str, device, attn_impl: str = "naive",
                    attn_order: str = "auto", moe_impl: str = "loop", gemm_impl: str = "bf16",
                    fp8_kernel: str = AUTO, mtp: bool | None = None, check_finite_values: bool = True,
                    mmap: bool = True, parallelize: Parallelize | None = None, progress: bool | None = None
                    ) -> DeepseekV3:
    """Build `cls(config, impl=...)` on `device` in `dtype` and fill it from the checkpoint in `source`.

    Everything that can be checked without the weights is checked before any weight memory is
    allocated: config.json against the tensor names (layer and expert counts), then every tensor's
    name, shape and dtype from the safetensors headers against the model built on the meta device.
    Then each tensor is read, checked to be finite (unless check_finite_values is False: a streaming
    reduction over each tensor as it is read) and put in place: on a CPU, a tensor whose stored dtype
    and shape are the parameter's becomes the parameter, its bytes mapped from the file copy-on-write
    (unless mmap is False), if they lie on a 64-byte boundary (`dsv3ref.atomic.DATA_ALIGNMENT`: every
    tensor of a file dsv3ref writes whose size is a multiple of 64 bytes); any other is copied into the
    parameter. A `Headers` source stops after
    the allocation: nothing is read (the model's values are whatever the device holds).

    How it computes: attn_impl ... fp8_kernel, each a value of dsv3ref.impl or "auto" where loading
    decides (`resolve_implementation`), and dtype (a torch dtype or "auto": `resolve_dtype`).

    MTP modules: config.json's num_nextn_predict_layers decides how many are read (from
    `model.layers.{num_hidden_layers + k}`); a checkpoint that stores none loads with MTP off
    (num_nextn_predict_layers = 0); their copies of the embedding and head must equal the main ones.
    mtp=False leaves them unread (only speculative decoding needs them); True requires them.

    FP8 checkpoints (`quantization_config.quant_method: fp8`): every `*.weight` stored in E4M3 comes
    with its `*.weight_scale_inv`. gemm_impl "bf16" dequantizes them on load (to `dtype`); "fp8" keeps
    the weights the release stores in FP8 as they are (the model's `FP8Linear` layers) and dequantizes
    any other FP8 tensor.

    parallelize: a parallel plan (see `Parallelize`; dsv3ref.parallel.from_pretrained passes one):
    only this process's part of each tensor is read. progress: a tqdm bar over the bytes read
    (None: shown when there is more than 1 GiB to read).
    """
    dtype = resolve_dtype(dtype, device)
    headers_only = isinstance(source, Headers)
    if headers_only:
        path = Path(source.label)
        files = dict.fromkeys(source.tensors, path)
        cfg = source.config
    else:
        path = Path(source)
        files = tensor_files(path)
        cfg = ModelConfig.from_pretrained(path)
    n_main, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    layer_ids = {int(m.group(1)) for m in map(_LAYER.match, files) if m}
    notes = []
    if n_mtp and not layer_ids & set(range(n_main, n_main + n_mtp)):
        if mtp:
            raise CheckpointError(f"{path}: mtp=True (speculative decoding) needs the MTP module(s) config.json "
                                  f"declares ({n_mtp}), but the checkpoint stores none")
        notes.append(f"config.json asks for {n_mtp} MTP module(s) but the checkpoint stores none: MTP is off")
        n_mtp = 0
    elif mtp and not n_mtp:
        raise CheckpointError(f"{path / 'config.json'}: mtp=True (speculative decoding) needs MTP modules, but "
                              "num_nextn_predict_layers is 0")
    elif mtp is False and n_mtp:
        notes.append(f"MTP module(s) not loaded (mtp=False): {n_mtp} left unread")
        n_mtp = 0
    check_layout(cfg, files, path / "config.json", n_mtp)
    fp8_weights = {name[: -len(SCALE_SUFFIX)] for name in files if name.endswith(".weight" + SCALE_SUFFIX)}
    if fp8_weights:
        _check_fp8_config(cfg, path)
    for name in sorted(fp8_weights):
        if name not in files:
            raise CheckpointError(f"{files[name + SCALE_SUFFIX]}: block scale {name + SCALE_SUFFIX} has no "
                                  f"weight {name}")
    impl = resolve_implementation(bool(fp8_weights), device, attn_impl=attn_impl, attn_order=attn_order,
                                  moe_impl=moe_impl, gemm_impl=gemm_impl, fp8_kernel=fp8_kernel)
    if impl.fp8_kernel == "scaled_mm" and scaled_mm_recipe(device) is None:
        raise ValueError(f"fp8_kernel='scaled_mm': torch {torch.__version__} offers no block-scaled scaled_mm on "
                         f"device {device} (it runs on a CPU whose torch build has scaled_mm's CPU kernel, or on an "
                         "SM90 GPU with CUDA >= 12.9); use fp8_kernel='emulate'")
    if impl.gemm_impl == "fp8" and not fp8_weights:
        raise ValueError(f"gemm_impl='fp8': {path} stores no FP8 weights (no *.weight_scale_inv tensors)")
    cfg = cfg.replace(num_nextn_predict_layers=n_mtp,
                      quantization_config=cfg.quantization_config if impl.gemm_impl == "fp8" else None)

    with torch.device("meta"):
        model = cls(cfg, impl=impl).to(dtype)  # FP8Linear layers keep their E4M3 weights and float32 scales
    full = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # meta: shapes, no memory
    shards = parallelize(model) if parallelize is not None else {}
    local = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # this process's part
    if cfg.tie_word_embeddings:
        del full["lm_head.weight"], local["lm_head.weight"]  # the embedding, loaded under its own name
    copies = checkpoint_copies(cfg)
    kept_fp8 = {name for name in fp8_weights if name + SCALE_SUFFIX in full}  # loaded as FP8, as stored
    for name in sorted(n.removesuffix(SCALE_SUFFIX) for n in full if n.endswith(SCALE_SUFFIX)):
        if name in files and name not in fp8_weights:
            raise CheckpointError(f"{files[name]}: gemm_impl='fp8' runs {name} as an FP8 GEMM, but the checkpoint "
                                  "stores it in high precision (no weight_scale_inv); load with gemm_impl='bf16'")

    # 1. Names, shapes and dtypes, from the index and the safetensors headers (of every tensor, also
    #    those another process reads).
    by_file: dict[Path, list[str]] = {}
    unused: list[str] = []
    dequantized = fp8_weights - kept_fp8  # FP8 tensors of the checkpoint that the model holds in high precision
    for name, file in files.items():
        weight = name.removesuffix(SCALE_SUFFIX)
        dequantized_scale = (name.endswith(SCALE_SUFFIX) and weight in dequantized
                             and (weight in full or weight in copies))
        if name in full or name in copies or dequantized_scale:
            by_file.setdefault(file, []).append(name)
            continue
        m = _LAYER.match(name)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            raise CheckpointError(f"{file}: stores lm_head.weight although config.json sets "
                                  "tie_word_embeddings=true (the head is the embedding)")
        if m and int(m.group(1)) >= n_main + n_mtp:
            unused.append(name)  # an MTP module beyond num_nextn_predict_layers (or MTP switched off / not asked for)
            continue
        raise CheckpointError(f"{file}: unexpected tensor {name} (not a parameter of the model described by "
                              f"config.json; {len(full)} parameters expected)")
    reader = TensorReader(files, shards, copies)  # one handle per file, from its header to its last tensor
    with reader:
        present = set()
        headers: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype) as stored
        for file, names in by_file.items():
            with nullcontext(_StoredHeaders(source.tensors) if headers_only else reader.open(file)) as f:
                stored = set(f.keys())
                for name in names:
                    if name not in stored:
                        raise CheckpointError(f"{file}: the index lists tensor {name} in this file, which does not "
                                              "hold it")
                    sl = f.get_slice(name)
                    shape, kind = tuple(sl.get_shape()), sl.get_dtype()
                    headers[name] = shape, kind
                    if name.endswith(SCALE_SUFFIX):
                        weight = name[: -len(SCALE_SUFFIX)]
                        want = tuple(-(-d // BLOCK) for d in full.get(copies.get(weight, weight), ()))
                        if shape != want:
                            raise CheckpointError(f"{file}: tensor {name} has shape {shape}, expected {want} (one "
                                                  f"scale per {BLOCK} x {BLOCK} block of {weight})")
                        if kind not in ("F32", "F64", "BF16", "F16"):
                            raise CheckpointError(f"{file}: tensor {name} has dtype {kind}, expected F32")
                        present.add(name)
                        continue
                    want = full[copies.get(name, name)]
                    if shape != want:
                        raise CheckpointError(f"{file}: tensor {name} has shape {shape}, expected {want} "
                                              f"from config.json")
                    allowed = _FLOAT_DTYPES | ({"F8_E4M3"} if name in fp8_weights else set())
                    if kind not in allowed:
                        hint = " (an FP8 weight needs its weight_scale_inv)" if kind.startswith("F8") else ""
                        raise CheckpointError(f"{file}: tensor {name} has dtype {kind}, expected one of "
                                              f"{sorted(allowed)}{hint}")
                    present.add(name)
        missing = sorted(set(full) - present)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(f"{path}: missing tensor(s) {shown}")

        # 2. Allocate, read this process's part of each tensor, check values, copy.
        def ours(name: str) -> bool:
            return copies.get(name, name) in local
        to_read = {file: [n for n in names if not n.endswith(SCALE_SUFFIX) and ours(n)]
                   for file, names in by_file.items()}
        if headers_only:
            model = model.to_empty(device=device)
            if cfg.tie_word_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
            model.load_report = LoadReport(path=path, unused_tensors=tuple(sorted(unused)),
                                           notes=(*notes, "headers only: no tensor was read"), bytes_read=0,
                                           headers_sha256=headers_digest(headers))
            return model.eval()
        # A module whose parameters the state_dict shows under other names, as views (the stacked experts of
        # dsv3ref.experts: `{e}.gate_proj.weight` is a slice of `gate_up_proj`), is allocated whole now and
        # filled by copying into those views: never mapped, so that no per-expert tensors wait to be stacked
        # (which would hold the experts' memory twice).
        shown = set(model.state_dict())
        for prefix, module in model.named_modules():
            own = [f"{prefix}.{p}" if prefix else p for p, _ in module.named_parameters(recurse=False)]
            if own and not set(own) <= shown:
                module.to_empty(device=device, recurse=False)
        targets = model.state_dict()  # on the meta device (shapes and dtypes) but for those views
        # A tensor read in the dtype, shape and (CPU) device of its target becomes the parameter itself:
        # for a tensor taken whole from the file, its bytes mapped copy-on-write (safetensors maps the file
        # privately), so the load makes no copy and the page cache holds the only one. Any other is copied
        # into memory allocated for it when it is read (so no memory is allocated for a tensor that is
        # mapped), and so is a tensor whose bytes are not DATA_ALIGNMENT-aligned in memory: a BLAS may
        # round a GEMM with it differently from the same weight aligned, so the loaded model would not
        # compute what the saved one did. (dsv3ref's own files align every tensor whose size allows it; a
        # file written elsewhere may align none.) The tied head is the embedding, tied again at the end.
        on_cpu = torch.device(device).type == "cpu"
        adoptable = {name for name, t in targets.items() if mmap and on_cpu and t.numel() and t.is_meta}
        placed: dict[str, torch.Tensor] = {}  # name -> the tensor that becomes it: mapped, or memory copied into

        def target(name: str) -> torch.Tensor:
            """The memory a tensor is copied into, allocated on first use."""
            like = targets[name]
            if not like.is_meta:
                return like  # a view into memory allocated above
            if name not in placed:
                placed[name] = torch.empty(like.shape, dtype=like.dtype, device=device)
            return placed[name]
        copy_values = {}
        total = sum(reader.nbytes(name, *headers[name]) for names in to_read.values() for name in names)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"loading {path.name}",
                   disable=not (progress if progress is not None else total > 2**30))
        last_use = {}  # file -> the last shard (in reading order) that reads from it, for its data or its scales
        for shard_number, (file, names) in enumerate(to_read.items(), 1):
            for name in names:
                if name in fp8_weights:  # kept FP8 or dequantized, its scales are read with it
                    last_use[files[name + SCALE_SUFFIX]] = shard_number
            last_use[file] = shard_number
        for file in by_file:
            if file not in last_use:
                reader.release(file)  # only its headers were needed
        with torch.no_grad(), bar:
            for shard_number, (file, names) in enumerate(to_read.items(), 1):
                bar.set_postfix_str(f"shard {shard_number}/{len(to_read)}", refresh=False)
                f = reader.open(file)
                for name in names:
                    value = reader.read(f, file, name)
                    if check_finite_values:
                        check_finite(value, file, name)
                    if name in fp8_weights:
                        if name in kept_fp8:
                            target(name + SCALE_SUFFIX).copy_(reader.scale(name, tuple(value.shape)))
                        else:
                            value = reader.dequantize(name, value, dtype)
                            if check_finite_values:
                                check_finite(value, file, f"{name} (dequantized to {dtype})")
                    if name in copies:
                        copy_values[name] = (file, value)
                    elif (name in adoptable and value.dtype == targets[name].dtype
                          and value.shape == targets[name].shape and value.is_contiguous()
                          and value.data_ptr() % DATA_ALIGNMENT == 0):
                        placed[name] = value
                    else:
                        target(name).copy_(value)
                    bar.update(reader.nbytes(name, *headers[name]))
                for done in [other for other, last in last_use.items() if last == shard_number]:
                    reader.release(done)
            model.load_state_dict(placed, strict=False, assign=True)
            if cfg.tie_word_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
            left = [name for name, t in model.state_dict().items() if t.is_meta]
            if left:  # every tensor this process holds is read above: a bug here, not in the checkpoint
                raise RuntimeError(f"load_pretrained: {len(left)} tensor(s) were not read, e.g. {left[0]}")
            targets = model.state_dict()
            for name, (file, value) in copy_values.items():
                main = targets[copies[name]]
                if not _equal_values(value, main):
                    raise CheckpointError(f"{file}: tensor {name} differs from {copies[name]}; dsv3ref shares the main "
                                          "model's embedding and head with the MTP modules, as the report does")
        model.load_report = LoadReport(path=path, unused_tensors=tuple(sorted(unused)), notes=tuple(notes),
                                       bytes_read=reader.bytes_read, headers_sha256=headers_digest(headers),
                                       files_opened=reader.opens)
        return model.eval()


def _equal_values(value: torch.Tensor, main: torch.Tensor, rows: int = 4096) -> bool:
    """Whether `value` (read from a file, on the CPU) holds the values of `main` (the model's tensor, on
    its device: a GPU too), compared on main's device a slice of rows at a time (at DeepSeek-V3's size a
    whole copy of the head is 1.85 GB)."""
    if value.shape != main.shape:
        return False
    pairs = zip(value.split(rows), main.split(rows), strict=True)
    return all(torch.equal(v.to(main.device, main.dtype), m) for v, m in pairs)


class _StoredHeaders:
    """A Headers source seen through the interface of an open safetensors file (keys, get_slice)."""

    def __init__(self, tensors: dict[str, tuple[tuple[int, ...], str]]):
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def get_slice(self, name: str):
        shape, kind = self.tensors[name]
        return SimpleNamespace(get_shape=lambda: list(shape), get_dtype=lambda: kind)


class TensorReader:
    """Reads tensors, or this process's Shard of them, and counts the bytes taken from the files.

    Each file is opened once (`open`) and kept open until `release` or the end of the `with` block, so
    a header, its tensors and the block scales beside them cost one open and one header parse."""

    def __init__(self, files: dict[str, Path], shards: dict[str, Shard], copies: dict[str, str]):
        self.files, self.shards, self.copies = files, shards, copies
        self.bytes_read = 0
        self.opens = 0
        self._handles: dict[Path, tuple[object, ExitStack]] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        for file in list(self._handles):
            self.release(file)

    def open(self, file: Path):
        """The open safetensors file (opened now if it is not yet)."""
        if file not in self._handles:
            stack = ExitStack()
            self._handles[file] = stack.enter_context(open_safetensors(file)), stack
            self.opens += 1
        return self._handles[file][0]

    def release(self, file: Path) -> None:
        """Close the file, if open (its data is no longer mapped)."""
        if file in self._handles:
            self._handles.pop(file)[1].close()

    def shard(self, name: str) -> Shard | None:
        return self.shards.get(self.copies.get(name, name))

    def nbytes(self, name: str, shape: tuple[int, ...], kind: str) -> int:
        """Bytes of `name` (stored with shape and safetensors dtype kind) this process reads: its Shard."""
        shape = list(shape)
        if (shard := self.shard(name)) is not None:
            shape[shard.dim] = shard.stop - shard.start
        return math.prod(shape) * _DTYPE_BYTES[kind]

    def read(self, f, file: Path, name: str, shard: Shard | None = None) -> torch.Tensor:
        """The tensor, or just `shard` of it (default: this process's Shard), read from open file f."""
        shard = shard or self.shard(name)
        try:
            if shard is None:
                value = f.get_tensor(name)
            else:
                part = f.get_slice(name)
                value = part[shard.index(len(part.get_shape()))]
        except Exception as e:
            raise CheckpointError(f"{file}: tensor {name} cannot be read ({type(e).__name__}: {e})") from None
        self.bytes_read += value.numel() * value.element_size()
        return value

    def scale(self, weight: str, weight_shape: tuple[int, ...], shard: Shard | None = None) -> torch.Tensor:
        """The block scales of FP8 weight `weight` (this process's part: `weight_shape`), checked."""
        name = weight + SCALE_SUFFIX
        file = self.files[name]
        shard = shard or self.shard(weight)
        scale = self.read(self.open(file), file, name, shard.blocks() if shard is not None else None)
        return check_scale(scale, file, name, weight, weight_shape)

    def dequantize(self, weight: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An FP8 weight (this process's part: value) dequantized with its block scales. A part that
        does not start on the 128-block grid takes each element's scale from the block it lies in."""
        shard = self.shard(weight)
        if shard is None or shard.start % BLOCK == 0:
            return dequantize_weight_fast(value, self.scale(weight, tuple(value.shape)), dtype=dtype)
        name = weight + SCALE_SUFFIX
        file = self.files[name]
        scale = self.read(self.open(file), file, name, shard.blocks())
        scale = check_scale(scale, file, name, weight, _covered(value.shape, shard))
        # the block (row, column) of every element of the part, counted from the first block read
        index = [torch.arange(n) // BLOCK for n in value.shape]
        index[shard.dim] = torch.arange(shard.start, shard.stop) // BLOCK - shard.start // BLOCK
        compute = torch.promote_types(dtype, torch.float32)
        per_element = scale.to(compute)[index[0][:, None], index[1][None, :]]
        return (value.to(compute) * per_element).to(dtype)


def _covered(shape: torch.Size, shard: Shard) -> tuple[int, ...]:
    """The shape whose 128-block grid is the scale part a Shard reads (for check_scale)."""
    out = list(shape)
    blocks = shard.blocks()
    out[shard.dim] = (blocks.stop - blocks.start) * BLOCK
    return tuple(out)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}  # the dtypes step 1 lets through


def check_scale(scale: torch.Tensor, file: Path, name: str, weight: str, weight_shape: tuple[int, ...]
                ) -> torch.Tensor:
    """The weight_scale_inv `scale` of an FP8 weight of shape weight_shape, checked: one per 128 x 128
    block, finite, positive, and small enough that E4M3's largest value times it stays finite in float32."""
    expected = tuple(-(-d // BLOCK) for d in weight_shape)
    if tuple(scale.shape) != expected:
        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(scale.shape)}, expected {expected} "
                              f"(one scale per {BLOCK} x {BLOCK} block of {weight}, shape {tuple(weight_shape)})")
    if not scale.is_floating_point() or not torch.isfinite(scale).all() or not (scale > 0).all():
        raise CheckpointError(f"{file}: tensor {name} must hold finite positive float scales")
    if not torch.isfinite(scale.float() * E4M3_MAX).all():
        raise CheckpointError(f"{file}: tensor {name} holds scales up to {scale.max().item():.3g}: times E4M3's "
                              f"largest value {E4M3_MAX:g} that overflows float32")
    return scale.float()
