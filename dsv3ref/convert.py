"""Checkpoint conversion between FP8 (block-scaled E4M3) and bf16, one shard at a time.

    python -m dsv3ref.convert fp8-to-bf16 SRC DST      # dequantize: weight_block * weight_scale_inv
    python -m dsv3ref.convert bf16-to-fp8 SRC DST      # quantize the linear layers DeepSeek-V3 ships in FP8

Each shard of SRC is read, converted and written, then dropped from memory before the next one, so
peak memory depends on the shard size, not the checkpoint's (tested: 2-4 shard sizes, counting the
mapped shard and what is read from it). A weight whose scale sits in another shard is paired
through a lazy read of that one tensor. The index (`weight_map`) and config.json
(`quantization_config`) are rewritten; other files (tokenizer, generation config) are copied.

Nothing is lost and nothing half-done is left where a loader would find it:
- SRC is only read; DST must not exist or be empty, and must not lie inside SRC.
- Everything is written into a sibling folder `.DST.converting` (with a `conversion.json` saying
  what is being converted) and renamed to DST when complete: DST either is a whole checkpoint or
  does not exist. Killed mid-way, a rerun of the same command resumes: shards already written (each
  one is itself written under a temporary name and renamed) are kept, temporary files are removed.
- The manifest records each source shard's size and modification time: a resume converts again the
  shards whose source changed since (and those that read a scale from them), and says so; a source
  shard that changes while being converted stops the conversion before DST is made.
- One conversion at a time into a DST: the work runs under a lock beside it (`.DST.lock`,
  dsv3ref.lock); a second conversion stops at once naming the holder, and a lock left by a killed
  conversion is taken over, said on screen.
- Every tensor is checked as the loader checks it, before it is written: weights finite, scales
  finite, positive and block-shaped; shard names plain and distinct. A failed check removes the
  sibling folder and names the file and tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3ref.argtypes import integer
from dsv3ref.atomic import (
    SAFETENSORS_DTYPES,
    aligned_order,
    atomic_stream_tensors,
    atomic_write,
    atomic_write_text,
    is_plain_name,
    remove_temporaries,
)
from dsv3ref.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    TensorReader,
    check_finite,
    open_safetensors,
    read_tensor,
    tensor_files,
)
from dsv3ref.fp8 import (
    BLOCK,
    E4M3,
    E4M3_MAX,
    FP8_WEIGHT,
    QUANTIZATION_CONFIG,
    SCALE_SUFFIX,
    dequantize_weight_fast,
    quantize_weight_fast,
)
from dsv3ref.lock import exclusive

FP8_LINEAR = FP8_WEIGHT  # the former name of the rule, which dsv3ref.fp8 now owns
DIRECTIONS = ("fp8-to-bf16", "bf16-to-fp8")
MANIFEST = "conversion.json"


def _work_folder(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.converting"


def _check_destination(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise ValueError(f"DST: {dst} lies inside the source folder {src}; SRC is only read, write elsewhere")
    if d in s.parents:
        raise ValueError(f"DST: {dst} contains the source folder {src}; write the conversion elsewhere")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"DST: {dst} exists and is not a folder")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"DST: {dst} is not empty; refusing to write into it (give a new or empty folder)")


def _shard_names(src: Path, files: dict[str, Path]) -> list[Path]:
    """SRC's shard files, checked to be plain names in SRC, so that each is written to its own DST file."""
    shards = sorted(set(files.values()))
    for shard in shards:
        rel = shard.relative_to(src).as_posix()
        if not is_plain_name(rel):
            raise CheckpointError(f"{src / INDEX_FILE}: shard {rel!r} is not a plain file name in {src}; the "
                                  "converter writes each shard under its name in DST and needs them flat and distinct")
    return shards


def _stamp(file: Path) -> list[int]:
    """What the manifest records of a source shard: [size, modification time in ns]."""
    st = file.stat()
    return [st.st_size, st.st_mtime_ns]


def _dependents(changed: set[str], files: dict[str, Path]) -> set[str]:
    """The shards whose conversion reads a changed shard: themselves, and (fp8-to-bf16) those holding
    an FP8 weight whose scale lies in a changed shard."""
    out = set(changed)
    for name, shard in files.items():
        scale = files.get(name + SCALE_SUFFIX)
        if scale is not None and scale.name in changed:
            out.add(shard.name)
    return out


def _start(work: Path, manifest: dict, files: dict[str, Path]) -> set[str]:
    """Create the work folder, or resume the same conversion in it; return the shards already written
    and still current (a source shard whose size or modification time changed since is converted again)."""
    if work.exists():
        try:
            previous = json.loads((work / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            raise FileExistsError(f"{work}: exists but holds no {MANIFEST} from this converter; remove it") from None
        def what(m: dict) -> tuple:  # the conversion a manifest describes, without the shards' stamps
            shards = m.get("shards")
            return (m.get("source"), m.get("direction"), m.get("scale_fmt"),
                    sorted(shards) if isinstance(shards, dict) else None)
        if what(previous) == what(manifest):
            remove_temporaries(work)
            changed = {n for n, stamp in manifest["shards"].items() if previous["shards"][n] != stamp}
            stale = {n for n in _dependents(changed, files) if (work / n).is_file()}
            if stale:
                print(f"convert: {len(changed)} source shard(s) changed since the interrupted conversion "
                      f"({', '.join(sorted(changed)[:3])}); converting {len(stale)} shard(s) again", file=sys.stderr)
                for name in stale:
                    (work / name).unlink()
            atomic_write_text(work / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            return {name for name in manifest["shards"] if (work / name).is_file()}
        print(f"convert: {work} holds an interrupted conversion of another source, direction or shard list; "
              "starting over", file=sys.stderr)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    atomic_write_text(work / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return set()


def _convert_shard(shard: Path, target: Path, files: dict[str, Path], direction: str, scale_fmt: str | None
                   ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Convert one shard into file `target`, streamed: the output's header is made from the shard's,
    then each tensor is read, checked, converted and written before the next is read (memory: the
    shard's mapped pages and one tensor's conversion). Returns the written tensors' dtypes and shapes."""
    with TensorReader(files, {}, {}) as reader:  # the shard, and any other holding its scales, opened once each
        f = reader.open(shard)
        names = [n for n in f.keys() if not (direction == "fp8-to-bf16" and n.endswith(SCALE_SUFFIX))]
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name in names:
            sl = f.get_slice(name)
            shape, kind = tuple(sl.get_shape()), sl.get_dtype()
            if kind not in _TORCH_DTYPES:
                raise CheckpointError(f"{shard}: tensor {name} has dtype {kind}, which the converter does not "
                                      f"know (expected one of {sorted(_TORCH_DTYPES)})")
            dtype = _TORCH_DTYPES[kind]
            if direction == "fp8-to-bf16" and dtype == E4M3:
                if name + SCALE_SUFFIX not in files:
                    raise CheckpointError(f"{shard}: FP8 tensor {name} has no {name + SCALE_SUFFIX}")
                specs[name] = torch.bfloat16, shape
            elif direction == "bf16-to-fp8" and FP8_WEIGHT.search(name) and len(shape) == 2:  # what the release
                specs[name] = E4M3, shape                                                      # stores in FP8
                specs[name + SCALE_SUFFIX] = torch.float32, tuple(-(-d // BLOCK) for d in shape)
            else:
                specs[name] = dtype, shape

        def in_file_order():
            for name in names:
                t = read_tensor(f, shard, name)
                if specs[name][0] == t.dtype:  # kept as it is
                    check_finite(t, shard, name)
                    yield name, t
                elif t.dtype == E4M3:  # fp8-to-bf16
                    check_finite(t, shard, name)  # the bytes: no NaN code
                    scale = reader.scale(name, tuple(t.shape))  # checked: finite, positive, 448 x it finite
                    if not torch.isfinite((scale * E4M3_MAX).to(torch.bfloat16)).all():  # so every product is
                        raise CheckpointError(f"{files[name + SCALE_SUFFIX]}: tensor {name + SCALE_SUFFIX} holds "
                                              f"scales up to {scale.max().item():.3g}: times E4M3's largest value "
                                              f"{E4M3_MAX:g} that overflows bfloat16")
                    yield name, dequantize_weight_fast(t, scale, dtype=torch.bfloat16)
                else:  # bf16-to-fp8
                    q, scale = quantize_weight_fast(t, scale_fmt=scale_fmt)
                    if not torch.isfinite(scale).all():  # NaN and Inf reach their block's largest magnitude
                        check_finite(t, shard, name)  # names the first one
                    yield name, q
                    yield name + SCALE_SUFFIX, scale

        specs = aligned_order(specs)  # every tensor that can starts on a 64-byte boundary (mapped in place)

        def converted():  # in specs' order: a tensor whose size is not a multiple of 64 bytes (block scales,
            waiting, order = {}, iter(specs)  # mostly) is held until the aligned ones are written
            want = next(order, None)
            for name, tensor in in_file_order():
                waiting[name] = tensor
                while want in waiting:
                    yield want, waiting.pop(want)
                    want = next(order, None)

        atomic_stream_tensors(target, specs, converted())
    return specs


_TORCH_DTYPES = {kind: dtype for dtype, kind in SAFETENSORS_DTYPES.items()}


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: what a container or `taskset` grants)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def convert(src: str | Path, dst: str | Path, direction: str, scale_fmt: str | None = None, progress=None,
            threads: int | None = None) -> None:
    """Convert the checkpoint in folder src into folder dst ("fp8-to-bf16" or "bf16-to-fp8").

    progress: a text stream for a progress bar (tqdm: bytes of SRC done, rate, time left), or None.
    threads: torch's intra-op threads while converting (default: the CPUs this process may use, never
    more; torch's own default can exceed them in a container and oversubscribe a busy machine).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected a positive integer, found {threads!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: found {direction!r}, expected one of {DIRECTIONS}")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt: found {scale_fmt!r}, expected None or 'ue8m0'")
    src, dst = Path(src), Path(dst)
    files = tensor_files(src)  # also checks that src is a checkpoint folder and its index stays inside it
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{src / 'config.json'}: cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{src / 'config.json'}: expected a JSON object, found {type(config).__name__}")
    shards = _shard_names(src, files)
    is_fp8 = (config.get("quantization_config") or {}).get("quant_method") == "fp8"
    if direction == "fp8-to-bf16" and not is_fp8:
        raise ValueError(f"SRC: {src / 'config.json'} has no FP8 quantization_config; nothing to dequantize")
    if direction == "bf16-to-fp8" and is_fp8:
        raise ValueError(f"SRC: {src / 'config.json'} is already FP8")
    _check_destination(src, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or available_cpus())
    try:
        with exclusive(dst.parent / f".{dst.name}.lock", f"convert into {dst}"):
            _check_destination(src, dst)  # again, under the lock: a conversion that just finished filled it
            _convert_locked(src, dst, direction, scale_fmt, progress, files, shards, config)
    finally:
        torch.set_num_threads(before)


def _convert_locked(src: Path, dst: Path, direction: str, scale_fmt: str | None, progress, files: dict[str, Path],
                    shards: list[Path], config: dict) -> None:
    work = _work_folder(dst)
    manifest = {"source": str(src.resolve()), "direction": direction, "scale_fmt": scale_fmt,
                "shards": {s.name: _stamp(s) for s in shards}}
    done = _start(work, manifest, files)
    weight_map: dict[str, str] = {}
    total_size = 0
    bar = tqdm(total=sum(s.stat().st_size for s in shards), unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"{direction} {src.name}", file=progress, disable=progress is None, dynamic_ncols=True)
    try:
        for shard in shards:
            bar.set_postfix_str(shard.name)
            target = work / shard.name
            if shard.name in done:  # written by an interrupted run of the same conversion
                with open_safetensors(target) as f:
                    for name in f.keys():
                        weight_map[name] = shard.name
                        sl = f.get_slice(name)
                        total_size += _nbytes(sl.get_shape(), sl.get_dtype())
            else:
                specs = _convert_shard(shard, target, files, direction, scale_fmt)
                weight_map.update(dict.fromkeys(specs, shard.name))
                total_size += sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())
            bar.update(shard.stat().st_size)
    except CheckpointError:
        bar.close()
        shutil.rmtree(work)  # bad input: nothing of this conversion is kept
        raise
    bar.close()

    if (src / INDEX_FILE).exists():
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(work / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    for other in src.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name not in (INDEX_FILE, "config.json"):
            atomic_write(work / other.name, lambda tmp, other=other: shutil.copyfile(other, tmp))
    if direction == "fp8-to-bf16":
        config.pop("quantization_config", None)
        config["torch_dtype"] = "bfloat16"
    else:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG, **({"scale_fmt": scale_fmt} if scale_fmt else {}))
    atomic_write_text(work / "config.json", json.dumps(config, indent=2) + "\n")
    changed = [s.name for s in shards if _stamp(s) != manifest["shards"][s.name]]
    if changed:
        raise CheckpointError(f"SRC: {', '.join(changed[:3])} changed while being converted; run the conversion "
                              "again (it converts the changed shards again)")
    (work / MANIFEST).unlink()
    if dst.exists():
        dst.rmdir()  # empty (checked above)
    os.rename(work, dst)


_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
          "BOOL": 1}


def _nbytes(shape, dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * _BYTES[dtype]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv3ref.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=DIRECTIONS)
    parser.add_argument("src", help="source checkpoint folder (read only)")
    parser.add_argument("dst", help="destination folder (new, or empty)")
    parser.add_argument("--scale-fmt", choices=["ue8m0"], default=None,
                        help="bf16-to-fp8: power-of-two scales, as DeepSeek-V3.1 configs request")
    parser.add_argument("--threads", type=integer(1), default=None,
                        help="threads to compute with (default: the CPUs this process may use, here "
                             f"{available_cpus()})")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.direction, scale_fmt=args.scale_fmt, progress=sys.stderr,
                threads=args.threads)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
