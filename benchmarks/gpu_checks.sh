#!/usr/bin/env bash
# The GPU-side checks as one prepared run, for a session lent a GPU machine (CI has none).
# Run from the repository root on a machine whose python3 has CUDA torch, einops, safetensors and
# transformers (the device image has them); dsv3ref is imported from the checkout.
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
#
# 1. the tests that need an SM90 GPU (torch's blockwise scaled_mm against the exact emulation);
# 2. the FP8 GEMM at DeepSeek-V3's shapes: emulation, scaled_mm, dense bf16;
# 3. the MoE layer in bf16: loop vs grouped vs HF's eager and grouped_mm experts.
set -euo pipefail
out=${1:-.}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/test_fp8.py -k "scaled_mm or hopper" 2>&1 | tee "$out/gpu_tests.txt"
python3 benchmarks/fp8_gemm.py --device cuda --tokens 1 512 4096 --repeats 10 2>&1 | tee "$out/fp8_gemm.txt"
python3 benchmarks/moe.py --device cuda --dtype bfloat16 --tokens 512 4096 16384 --repeats 10 2>&1 | tee "$out/moe.txt"
