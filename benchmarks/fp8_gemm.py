"""The block-scaled FP8 GEMM at DeepSeek-V3's projection shapes: dsv3ref's exact emulation, its
dequantize path (fp8_kernel "dequantize": the weight dequantized once, as FP8Linear keeps it, the
activation's tiles at every call, one float32 GEMM) and its scaled_mm path, against a dense GEMM on
the dequantized weight.

    python benchmarks/fp8_gemm.py                      # CPU, 1 and 64 tokens
    python benchmarks/fp8_gemm.py --device cuda --tokens 1 512 4096

The dense GEMM is the peer because it is what HF transformers runs here: its FP8 layers call
kernels downloaded from the Hugging Face hub (DeepGEMM or Triton, GPU only), so offline, or on a
CPU, it dequantizes FP8 checkpoints on load. The dense operands are float32 on a CPU and bfloat16
on a GPU. Ratios are time of the dense GEMM / time of the contender: above 1 is faster than dense.
Every contender's result is checked against the emulation before it is timed.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from common import best_of, machine

from dsv3ref.fp8 import (
    dequantize_weight,
    fp8_matmul,
    fp8_matmul_dequantized,
    fp8_matmul_scaled_mm,
    quantize_activation,
    quantize_weight,
    rowwise_weight,
    scaled_mm_recipe,
)

# (name, in_features, out_features) of DeepSeek-V3's linear layers (config.json of the release).
SHAPES = [
    ("q_a_proj", 7168, 1536),
    ("q_b_proj", 1536, 24576),
    ("kv_a_proj_with_mqa", 7168, 576),
    ("kv_b_proj", 512, 32768),
    ("o_proj", 16384, 7168),
    ("expert gate_proj", 7168, 2048),
    ("expert down_proj", 2048, 7168),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", nargs="*", help="only these layer names (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dense_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    recipe = scaled_mm_recipe(device)
    print(f"machine: {machine(device)}")
    print(f"dense peer in {dense_dtype}; scaled_mm recipe on {device}: {recipe}")
    g = torch.Generator().manual_seed(0)
    for name, k, n in SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        w_q, w_s = quantize_weight((torch.randn(n, k, generator=g) * 0.02).to(device))
        w_dense = dequantize_weight(w_q, w_s, dtype=dense_dtype)  # (n, k)
        w_float = w_dense if dense_dtype == torch.float32 else dequantize_weight(w_q, w_s)  # what FP8Linear keeps
        for m in args.tokens:
            x = torch.randn(m, k, generator=g).to(device)
            x_q, x_s = quantize_activation(x)
            contenders = {
                "dense (dequantized)": partial(torch.matmul, x.to(dense_dtype), w_dense.T),
                "dsv3ref emulate": partial(fp8_matmul, x_q, x_s, w_q, w_s),
                "dsv3ref dequantize": partial(fp8_matmul_dequantized, x_q, x_s, w_q, w_s, w_dense=w_float),
            }
            if recipe is not None:  # the weight laid out once, as FP8Linear keeps it
                prepared = rowwise_weight(w_q, w_s) if recipe == "rowwise" else None
                contenders[f"dsv3ref scaled_mm ({recipe})"] = partial(fp8_matmul_scaled_mm, x_q, x_s, w_q, w_s,
                                                                      w_rowwise=prepared)
            reference = fp8_matmul(x_q, x_s, w_q, w_s).double()
            times = {}
            for label, fn in contenders.items():
                err = ((fn().double() - reference).abs().max() / reference.abs().max()).item()
                # dense skips activation quantization (a few % apart); the FP8 paths compute the same formula
                assert err < (0.1 if label.startswith("dense") else 2e-3), f"{label} vs the emulation: {err}"
                times[label] = best_of(fn, args.repeats, device)
            dense = times["dense (dequantized)"]
            for label, t in times.items():
                print(f"{name:20s} {m:5d} x {k:5d} -> {n:5d}  {label:30s} {t * 1e3:9.3f} ms  {dense / t:6.2f}x dense")


if __name__ == "__main__":
    main()
