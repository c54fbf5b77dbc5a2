"""Writing files so that a reader never sees a half-written one.

Every file dsv3ref writes goes to a temporary name in the same folder and is renamed into place
once complete: a rename within a folder is atomic, so the final name holds either the old file or
the new one. Temporary files are created like any new file (mode 0666 less the umask), so a
checkpoint written here is readable by whoever the umask allows, as with `cp` or `torch.save`.
Their names start with "." and end with ".tmp"; `remove_temporaries` clears what a killed writer
left behind. A folder written as a whole (a training checkpoint) is built the same way under a
temporary folder name (`atomic_folder`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

TMP_SUFFIX = ".tmp"

DATA_ALIGNMENT = 64
"""Where dsv3ref's safetensors files start their data, and the alignment a weight mapped from a file
must have to be used in place (dsv3ref.checkpoint). MKL's float32 GEMM on an AVX2 CPU rounds
differently for a weight 4 or 8 bytes off a 16-byte boundary (measured: a tiny model's logits moved in
the last bit, and more where an FP8 layer re-rounds its input); 64 is AVX-512's and a cache line's."""


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) with a new temporary file beside `path`, then rename it to `path`.

    The temporary file is removed if write fails or is interrupted by an exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask, as for any new file
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaced the file (safetensors writes it 0600) gets the same mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically, every tensor whose size is a multiple of `DATA_ALIGNMENT`
    bytes starting on such a boundary (those first, then the others, each group in the dict's order;
    safetensors allows any order of the data, not gaps)."""
    specs = aligned_order({name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()})
    atomic_stream_tensors(path, specs, ((name, tensors[name]) for name in specs))


def aligned_order(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]
                  ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """specs (name -> (dtype, shape)) reordered for `atomic_stream_tensors`: the tensors whose size is
    a multiple of DATA_ALIGNMENT bytes first, then the others, each group in its given order; written
    so, every tensor of the first group starts on a DATA_ALIGNMENT boundary of the file."""
    def aligned(spec):
        return math.prod(spec[1]) * spec[0].itemsize % DATA_ALIGNMENT == 0
    return ({n: spec for n, spec in specs.items() if aligned(spec)}
            | {n: spec for n, spec in specs.items() if not aligned(spec)})



def atomic_folder(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) with a new temporary folder beside `path`, then rename it to `path`, which must
    not exist (FileExistsError: a folder written this way is never overwritten). The temporary folder
    is removed if write fails or is interrupted by an exception."""
    path = Path(path)
    if os.path.lexists(path):
        raise FileExistsError(f"{path}: exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        write(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(folder: str | Path) -> list[str]:
    """Delete the temporary files and folders an interrupted writer left in `folder`; return their names."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if p.is_symlink():
            continue
        if p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            continue
        removed.append(p.name)
    return sorted(removed)


def is_plain_name(name: object) -> bool:
    """Whether `name` is a bare file name: no folder part, not "." or "..", not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
                      torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
"""torch dtype -> the safetensors header's name for it."""


def atomic_stream_tensors(path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                          tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write a safetensors file atomically, one tensor at a time: memory for one tensor, not the file's.

    specs: name -> (dtype, shape) of every tensor, in the order of `tensors`, which yields (name,
    tensor) pairs as they are computed. The header (names, dtypes, shapes, offsets) is written from
    specs first, then each tensor's bytes as it arrives; a tensor out of order or of another dtype or
    shape than its spec raises ValueError (nothing is left at `path`). The file is what
    `safetensors.torch.save_file` writes for the same tensors, up to the order of the header's keys
    and the header's padding (spaces, to start the data on a `DATA_ALIGNMENT` boundary: save_file pads
    to 8).
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % DATA_ALIGNMENT)  # the data starts DATA_ALIGNMENT-aligned in the file

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            order = iter(specs.items())
            for name, tensor in tensors:
                want_name, (dtype, shape) = next(order, (None, (None, None)))
                if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{path}: tensor {name} ({tensor.dtype}, {tuple(tensor.shape)}) does not match "
                                     f"the header's next entry {want_name} ({dtype}, {shape})")
                f.write(memoryview(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))
            missing = [name for name, _ in order]
            if missing:
                raise ValueError(f"{path}: {len(missing)} tensor(s) of the header never written ({missing[0]}, ...)")

    atomic_write(path, write)
