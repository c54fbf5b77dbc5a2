"""Checkpoint conversion between FP8 (block-scaled E4M3) and bf16, one shard at a time.

    python -m dsv3ref.convert fp8-to-bf16 SRC DST      # dequantize: weight_block * weight_scale_inv
    python -m dsv3ref.convert bf16-to-fp8 SRC DST      # quantize the linear layers DeepSeek-V3 ships in FP8

Each shard of SRC is read, converted and written to DST under a temporary name, renamed when
complete, and dropped from memory before the next one, so peak memory depends on the shard size,
not the checkpoint's (tested: 2-4 shard sizes, counting the mapped shard and what is read from it). A
weight whose scale sits in another shard is paired through a lazy read of that one tensor. The
index (`weight_map`) and config.json (`quantization_config`) are rewritten; other files (tokenizer,
generation config) are copied. SRC is only read.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from dsv3ref.checkpoint import INDEX_FILE, atomic_save_tensors, atomic_write_text, tensor_files
from dsv3ref.fp8 import dequantize_weight, quantize_weight

# The linear layers stored in FP8 in the DeepSeek-V3 release: attention projections, dense MLPs,
# routed and shared experts. Embeddings, norms, routers, eh_proj and heads stay in high precision.
FP8_LINEAR = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                        r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")
SCALE = "_scale_inv"
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _progress(i: int, n: int, name: str, out) -> None:
    width = 30
    done = width * i // n
    out.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {name}")
    if i == n:
        out.write("\n")
    out.flush()


def convert(src: str | Path, dst: str | Path, direction: str, scale_fmt: str | None = None, progress=None) -> None:
    """Convert the checkpoint in folder src into folder dst ("fp8-to-bf16" or "bf16-to-fp8").

    progress: a text stream for a progress bar (one step per shard), or None for silence.
    """
    if direction not in ("fp8-to-bf16", "bf16-to-fp8"):
        raise ValueError(f"direction: found {direction!r}, expected 'fp8-to-bf16' or 'bf16-to-fp8'")
    src, dst = Path(src), Path(dst)
    files = tensor_files(src)  # also checks that src is a checkpoint folder
    config = json.loads((src / "config.json").read_text())
    if dst.resolve() == src.resolve():
        raise ValueError(f"DST: {dst} is the source folder; write the conversion elsewhere")
    if dst.exists() and (any(dst.glob("*.safetensors")) or (dst / INDEX_FILE).exists()):
        raise FileExistsError(f"DST: {dst} already holds a checkpoint; refusing to overwrite it")
    is_fp8 = (config.get("quantization_config") or {}).get("quant_method") == "fp8"
    if direction == "fp8-to-bf16" and not is_fp8:
        raise ValueError(f"SRC: {src / 'config.json'} has no FP8 quantization_config; nothing to dequantize")
    if direction == "bf16-to-fp8" and is_fp8:
        raise ValueError(f"SRC: {src / 'config.json'} is already FP8")

    def scale_of(name: str) -> torch.Tensor:
        if name + SCALE not in files:
            raise ValueError(f"{files[name]}: FP8 tensor {name} has no {name + SCALE}")
        with safe_open(files[name + SCALE], framework="pt") as f:
            return f.get_tensor(name + SCALE)

    dst.mkdir(parents=True, exist_ok=True)
    shards = sorted(set(files.values()))
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, shard in enumerate(shards, 1):
        out: dict[str, torch.Tensor] = {}
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                if direction == "fp8-to-bf16":
                    if name.endswith(SCALE):
                        continue
                    t = f.get_tensor(name)
                    if t.dtype == torch.float8_e4m3fn:
                        t = dequantize_weight(t, scale_of(name), dtype=torch.bfloat16)
                    out[name] = t
                else:
                    t = f.get_tensor(name)
                    if FP8_LINEAR.search(name) and t.dim() == 2:
                        out[name], out[name + SCALE] = quantize_weight(t, scale_fmt=scale_fmt)
                    else:
                        out[name] = t
        atomic_save_tensors(dst / shard.name, out)
        weight_map.update(dict.fromkeys(out, shard.name))
        total_size += sum(t.numel() * t.element_size() for t in out.values())
        del out
        if progress is not None:
            _progress(i, len(shards), shard.name, progress)
    if (src / INDEX_FILE).exists():
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(dst / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    if direction == "fp8-to-bf16":
        config.pop("quantization_config", None)
        config["torch_dtype"] = "bfloat16"
    else:
        config["quantization_config"] = dict(FP8_CONFIG, **({"scale_fmt": scale_fmt} if scale_fmt else {}))
    atomic_write_text(dst / "config.json", json.dumps(config, indent=2) + "\n")
    for other in src.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name not in (INDEX_FILE, "config.json"):
            tmp = dst / f".{other.name}.tmp"
            shutil.copy2(other, tmp)
            tmp.replace(dst / other.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv3ref.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["fp8-to-bf16", "bf16-to-fp8"])
    parser.add_argument("src", help="source checkpoint folder (read only)")
    parser.add_argument("dst", help="destination folder (new, or empty)")
    parser.add_argument("--scale-fmt", choices=["ue8m0"], default=None,
                        help="bf16-to-fp8: power-of-two scales, as DeepSeek-V3.1 configs request")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.direction, scale_fmt=args.scale_fmt, progress=sys.stderr)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
