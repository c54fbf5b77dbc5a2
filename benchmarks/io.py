"""Loading and conversion against their floors, contenders interleaved round by round.

    python benchmarks/io.py                         # a 0.9 GiB float32 checkpoint of the "small" preset's shape
    python benchmarks/io.py --layers 16 --rounds 5  # bigger, more rounds
    python benchmarks/io.py --threads 2

One random checkpoint is written in the release's layout (shards of --shard-mib), then converted to
FP8 once. Every round runs each contender once, in the same order (A, B, C, A, B, C, ...), so a
machine that gets busier or quieter during the run affects all of them alike; the page cache is warm
(every file is read once before the first round). Reported: the median over rounds and the spread
(min-max), and each contender's median as a ratio to its floor and to its peer:

- load floor: every tensor of every shard read into memory once (`safe_open(...).get_tensor`, which
  maps the file, then a copy that reads its bytes): the least a loader that owns its weights does.
  Contenders: `DeepseekV3.from_pretrained` (the weights mapped from the files, copy-on-write), without
  the finite check, and with mmap=False (every weight copied into memory the model owns); HF
  transformers' `DeepseekV3ForCausalLM.from_pretrained` on the same folder.
- conversion floor: every shard read (`load_file`) and a shard of the converted checkpoint's tensor
  names, shapes and dtypes made in memory and written (`torch.zeros`, `save_file`): the bytes a
  shard-by-shard converter must move, with no compute. (Until 2026-12-03 the floor wrote `torch.empty`
  tensors: memory never written, which Linux maps to one shared zero page, so the floor read its
  output from one cached page, which no converter can.) Contenders: `dsv3ref.convert` bf16-to-fp8 and fp8-to-bf16.

The machine's warm read bandwidth (the files read into a buffer) is printed beside. One thread by
default (`--threads`): the machine is shared.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv3ref
from dsv3ref.convert import convert


def read_floor(folder: Path) -> None:
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt", device="cpu") as f:
            for name in f.keys():
                f.get_tensor(name).clone()  # get_tensor maps the file; the clone reads the bytes


def copy_floor(src: Path, dst: Path, like: Path) -> None:
    """Every shard of src read, and a shard of the converted checkpoint's names, shapes and dtypes (those
    of `like`'s shard of the same name) written: the bytes a converter must move, with no compute."""
    dst.mkdir()
    for shard in sorted(src.glob("*.safetensors")):
        load_file(shard)
        # zeros: memory really written, as a converter writes its output (memory never touched, torch.empty's,
        # is the kernel's one shared zero page: free to read)
        with safe_open(like / shard.name, framework="pt", device="cpu") as f:
            out = {name: torch.zeros(f.get_slice(name).get_shape(),
                                     dtype=getattr(torch, _DTYPES[f.get_slice(name).get_dtype()]))
                   for name in f.keys()}
        save_file(out, dst / shard.name, metadata={"format": "pt"})


_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "float8_e4m3fn", "F64": "float64"}


def bandwidth(folder: Path) -> float:
    """Warm read bandwidth in GiB/s: every file read into one reused buffer."""
    files = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    buf = bytearray(64 * 2**20)
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return size / (time.perf_counter() - start) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 'small' preset's shape")
    parser.add_argument("--shard-mib", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-hf", action="store_true", help="leave HF transformers out")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: the system's temporary "
                        "folder; /dev/shm takes the disk's write-back out of the conversion rows)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dsv3ref.ModelConfig.preset("small").replace(num_hidden_layers=args.layers, num_nextn_predict_layers=0)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        dsv3ref.save_pretrained(dsv3ref.DeepseekV3(cfg), tmp / "f32", max_shard_bytes=args.shard_mib * 2**20)
        convert(tmp / "f32", tmp / "fp8", "bf16-to-fp8", threads=args.threads)
        convert(tmp / "fp8", tmp / "bf16", "fp8-to-bf16", threads=args.threads)  # the shapes the floor writes
        sizes = {k: sum(f.stat().st_size for f in (tmp / k).glob("*.safetensors")) for k in ("f32", "fp8")}
        print(machine())
        print(f"checkpoint: {sizes['f32'] / 2**30:.2f} GiB float32 in {len(list((tmp / 'f32').glob('*.safetensors')))} "
              f"shards ({sizes['fp8'] / 2**30:.2f} GiB as FP8); {args.threads} thread(s), {args.rounds} rounds, warm "
              f"page cache; read bandwidth {bandwidth(tmp / 'f32'):.2f} GiB/s")
        counter = iter(range(10**9))

        def fresh(name: str) -> Path:
            out = tmp / f"{name}-{next(counter)}"
            return out

        def run_convert(src: str, direction: str) -> None:
            out = fresh("conv")
            convert(tmp / src, out, direction, threads=args.threads)
            shutil.rmtree(out)

        def run_copy(src: str, like: str) -> None:
            out = fresh("copy")
            copy_floor(tmp / src, out, tmp / like)
            shutil.rmtree(out)

        contenders = {
            "load floor (read every tensor)": lambda: read_floor(tmp / "f32"),
            "dsv3ref from_pretrained": lambda: dsv3ref.DeepseekV3.from_pretrained(tmp / "f32"),
            "dsv3ref from_pretrained, check_finite=False": lambda: dsv3ref.DeepseekV3.from_pretrained(
                tmp / "f32", check_finite=False),
            "dsv3ref from_pretrained, mmap=False": lambda: dsv3ref.DeepseekV3.from_pretrained(tmp / "f32", mmap=False),
            "conversion floor f32 -> fp8 (read + write)": lambda: run_copy("f32", "fp8"),
            "convert bf16-to-fp8": lambda: run_convert("f32", "bf16-to-fp8"),
            "conversion floor fp8 -> bf16 (read + write)": lambda: run_copy("fp8", "bf16"),
            "convert fp8-to-bf16": lambda: run_convert("fp8", "fp8-to-bf16"),
        }
        if not args.no_hf:
            from transformers import DeepseekV3ForCausalLM
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            contenders["HF from_pretrained"] = lambda: DeepseekV3ForCausalLM.from_pretrained(tmp / "f32",
                                                                                              dtype=torch.float32)
        read_floor(tmp / "f32")  # warm the page cache
        read_floor(tmp / "fp8")
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for fn in contenders.values():  # one uncounted round: imports, first-call setup
            fn()
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        floor_of = {"dsv3ref from_pretrained": "load floor (read every tensor)",
                    "dsv3ref from_pretrained, check_finite=False": "load floor (read every tensor)",
                    "dsv3ref from_pretrained, mmap=False": "load floor (read every tensor)",
                    "HF from_pretrained": "load floor (read every tensor)",
                    "convert bf16-to-fp8": "conversion floor f32 -> fp8 (read + write)",
                    "convert fp8-to-bf16": "conversion floor fp8 -> bf16 (read + write)"}
        for name, t in times.items():
            line = f"{name:45s} median {med[name]:6.2f} s (min {min(t):5.2f}, max {max(t):5.2f})"
            if name in floor_of:
                line += f"  {med[name] / med[floor_of[name]]:4.2f}x its floor"
            if name.startswith("dsv3ref from") and "HF from_pretrained" in med:
                line += f", {med['HF from_pretrained'] / med[name]:4.2f}x HF's speed"
            print(line)


if __name__ == "__main__":
    main()
