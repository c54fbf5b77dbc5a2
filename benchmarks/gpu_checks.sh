#!/usr/bin/env bash
# The GPU-side checks as one prepared run, for a session lent a GPU machine (CI has none).
# Run from the repository root on a machine whose python3 has CUDA torch, einops, safetensors and
# transformers (the device image has them); dsv3ref is imported from the checkout.
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
#   STEPS="1 7 9" BUDGET_S=540 bash benchmarks/gpu_checks.sh OUT_DIR   # chosen steps, in this order, within a budget
#
# Each step runs under its own time limit (LIMIT below, cut to what is left of BUDGET_S, counted from the
# script's start), so one step that hangs or fails does not stop the others; OUT_DIR/steps.txt gets each
# step's exit status and seconds. Piping the output through a filter, keep it line-buffered
# (grep --line-buffered): a run stopped by an outer timeout otherwise returns nothing.
#
# 1. the tests that need an SM90 GPU (torch's blockwise scaled_mm against the exact emulation);
# 2. the FP8 GEMM at DeepSeek-V3's shapes: emulation, scaled_mm, dense bf16;
# 3. the MoE layer in bf16: loop vs grouped (one run, and the CPU's runs of 2,048) vs HF's eager and grouped_mm experts;
# 4. compiled decoding on CUDA (mode="reduce-overhead": CUDA graphs over the static cache) against eager;
# 5. scale-out at world size 1 on NCCL: the sharded loader onto CUDA, the split model against the whole;
# 6. training on CUDA (float32 and FP8 GEMMs), 30 steps each;
# 7. DeepSeek-V3 at full width on one GPU (benchmarks/full_width.py: 3 dense + 1 MoE layer of 256 FP8
#    experts, as a launch allocates them): the kernel "auto" picks against the exact emulation, and the
#    planner against torch's allocator at 32 prompts x 4096 tokens;
# 8. with more than one GPU: two layers at DeepSeek-V3's widths, every layout and exchange over NCCL at
#    the GPUs' count against one process (float64);
# 9. the kernel oracle's sweep (python -m dsv3ref.kernels.check) on CUDA: the reference itself, torch's
#    blockwise scaled_mm as DeepGEMM's fp8_gemm_nt, FlashMLA-style decoding from sgl-kernel where installed;
# 10. training across processes on NCCL (pp = the GPU count, DualPipeV) against one process on the same GPU;
# 11. a training step on the GPU (benchmarks/train_step.py --device cuda): against HF's, the MTP's share, and
#     the exact FP8 emulation against the float32 step and its float64-GEMM floor (float64 GEMMs cost
#     about what float32 ones do on an H200, unlike a CPU's).
set -uo pipefail
out=${1:-.}
mkdir -p "$out"
ckpt=$(mktemp -d)
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 out ckpt gpus
python3 -c "import torch, dsv3ref; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$out/steps.txt"
python3 - "$ckpt" <<'EOF2'
import sys

import torch

import dsv3ref

torch.manual_seed(0)
dsv3ref.save_pretrained(dsv3ref.DeepseekV3(dsv3ref.ModelConfig.preset("tiny")), sys.argv[1], max_shard_bytes=300_000)
EOF2

# 1. the tests that need an SM90 GPU
step_1() {
python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/test_fp8.py tests/test_mtp.py tests/test_moe.py -k "scaled_mm or hopper or cuda" 2>&1 | tee "$out/gpu_tests.txt"
}
# 2. the FP8 GEMM at DeepSeek-V3's shapes
step_2() {
python3 benchmarks/fp8_gemm.py --device cuda --tokens 1 512 4096 --repeats 10 2>&1 | tee "$out/fp8_gemm.txt"
}
# 3. the MoE layer in bf16
step_3() {
python3 benchmarks/moe.py --device cuda --dtype bfloat16 --tokens 512 4096 16384 --repeats 10 2>&1 | tee "$out/moe.txt"
}
# 4. compiled decoding on CUDA against eager
step_4() {
python3 - <<'EOF' 2>&1 | tee "$out/compiled_decode.txt"
import time

import torch

import dsv3ref

cfg = dsv3ref.ModelConfig.preset("small").replace(num_nextn_predict_layers=1)
prompt = [list(range(1, 257))]
for dtype, variants in ((torch.bfloat16, ("eager", "compiled")),
                        (torch.float32, ("eager", "compiled", "speculative eager", "speculative compiled"))):
    # bf16 for speed; float32 for equality (a random model's logits are near-ties that bf16 rounding tips)
    torch.manual_seed(0)
    model = dsv3ref.DeepseekV3(cfg, attn_impl="absorb", moe_impl="grouped").to("cuda", dtype).eval()
    runs = {}
    for name in variants:
        kw = dict(compile="compiled" in name, speculative="speculative" in name)
        dsv3ref.generate(model, prompt, 64, eos_token_id=[], **kw)  # warm-up, compilation, CUDA graphs
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = dsv3ref.generate(model, prompt, 64, eos_token_id=[], **kw)
        torch.cuda.synchronize()
        runs[name] = out.tokens[0]
        same = sum(a == b for a, b in zip(runs["eager"], runs[name], strict=False))
        print(f"{str(dtype)[6:]:9s} {name:21s} {1e3 * out.stats['decode_seconds'] / 63:6.2f} ms/token "
              f"(total {time.perf_counter() - start:.2f} s); tokens equal to eager's: {same} of 64")
    del model
EOF
}
step_5() {
# 5. scale-out on one GPU: NCCL at world size 1 (torchrun), the sharded loader placing its tensors on
#    CUDA, and the split model against the whole one (same GPU, float32).
python3 -m torch.distributed.run --nproc-per-node 1 -m dsv3ref.parallel.selfcheck "$ckpt" 2>&1 | tee "$out/scale_out_nccl.txt"
python3 -m torch.distributed.run --nproc-per-node 1 -m dsv3ref.parallel.selfcheck "$ckpt" --layout dp --moe-comm alltoall 2>&1 | tee -a "$out/scale_out_nccl.txt"
}
step_6() {
# 6. training on CUDA, unchanged code: 30 steps in float32 and with FP8 GEMMs (emulated), losses compared.
python3 -m dsv3ref train --device cuda --steps 30 --eval-every 30 --out-dir "$ckpt/train_f32" 2>&1 | tail -1 | tee "$out/train_cuda.txt"
python3 -m dsv3ref train --device cuda --steps 30 --eval-every 30 --fp8 --out-dir "$ckpt/train_fp8" 2>&1 | tail -1 | tee -a "$out/train_cuda.txt"
}
step_7() {
# 7. full width on one GPU: the launch's defaults, the planner against the allocator.
python3 benchmarks/full_width.py --device cuda 2>&1 | tee "$out/full_width.txt"
}
step_8() {
# 8. NCCL across GPUs, when there are several: each layout and exchange against one process.
if [ "$gpus" -gt 1 ]; then
  # DeepSeek-V3's widths (hidden 7168, 128 heads, FFN 18432, experts 2048 wide), 2 layers (one dense,
  # one MoE of 32 experts in 8 groups), a 16,384-token vocabulary: 2.5B parameters, made on the GPU
  python3 - "$ckpt/wide" <<'EOF3'
import sys

import torch

import dsv3ref

cfg = dsv3ref.ModelConfig.preset("deepseek-v3").replace(
    num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=32, vocab_size=16384,
    num_nextn_predict_layers=0, quantization_config=None)
torch.manual_seed(0)
with torch.device("cuda"):
    model = dsv3ref.DeepseekV3(cfg).to(torch.bfloat16)
dsv3ref.save_pretrained(model, sys.argv[1])
EOF3
  for combo in "tp allreduce" "tp alltoall" "dp allreduce" "dp alltoall"; do
    set -- $combo
    python3 -m torch.distributed.run --nproc-per-node "$gpus" -m dsv3ref.parallel.selfcheck "$ckpt/wide" \
      --layout "$1" --moe-comm "$2" 2>&1 | tail -1 | tee -a "$out/scale_out_nccl_multi.txt"
  done
fi
}
step_9() {
# 9. the kernel oracle (dsv3ref.kernels.check) against GPU kernels at DeepSeek-V3's shapes: the reference
#    on CUDA (must pass), torch's blockwise scaled_mm as DeepGEMM's fp8_gemm_nt, and FlashMLA-style
#    decoding from sgl-kernel where the machine has it installed (said so where it has not).
for op in "mla_decode dsv3ref.kernels:flash_mla_with_kvcache" "fp8_gemm dsv3ref.kernels:fp8_gemm_nt" \
          "fp8_gemm kernel_adapters:scaled_mm_gemm"; do
  set -- $op
  PYTHONPATH=$PWD:$PWD/benchmarks python3 -m dsv3ref.kernels.check "$2" --op "$1" --device cuda \
    2>&1 | tail -3 | tee -a "$out/kernel_checks.txt" || true
done
if python3 -c "import sgl_kernel" 2>/dev/null; then
  PYTHONPATH=$PWD:$PWD/benchmarks python3 -m dsv3ref.kernels.check kernel_adapters:flash_mla_decode \
    --op mla_decode --device cuda 2>&1 | tee -a "$out/kernel_checks.txt" || true
else
  echo "sgl-kernel: not installed on this machine: FlashMLA decoding not checked" \
    | tee -a "$out/kernel_checks.txt"
fi
}
step_10() {
# 10. training across processes on CUDA (NCCL): the distributed trainer on the GPU(s) this machine has,
#     against the single process on the same device; float32, so equal to rounding (the float64 equality
#     is CI's, on gloo). pp = the GPU count under DualPipeV (one GPU: two stages on it in a V).
args="train --steps 3 --batch-size 16 --seq-len 64 --warmup 1 --device cuda --microbatches $((2 * gpus < 4 ? 4 : 2 * gpus))"
python3 -m dsv3ref $args --out-dir "$ckpt/train_one" 2>/dev/null | tail -1 | tee -a "$out/train_distributed.txt"
python3 -m torch.distributed.run --nproc-per-node "$gpus" -m dsv3ref $args --pp "$gpus" --schedule dualpipev \
  --out-dir "$ckpt/train_pp" 2>&1 | tail -1 | tee -a "$out/train_distributed.txt"
}
step_11() {
python3 benchmarks/train_step.py --device cuda --repeats 7 2>&1 | tee "$out/train_step.txt"
python3 benchmarks/train_step.py --device cuda --preset small --batch 4 --seq 128 --repeats 5 2>&1 \
  | tee -a "$out/train_step.txt"
}

# seconds each step may take at most (a step over it is stopped: rc 124)
declare -A LIMIT=([1]=90 [2]=60 [3]=90 [4]=180 [5]=60 [6]=90 [7]=240 [8]=300 [9]=120 [10]=120 [11]=150)
export -f step_1 step_2 step_3 step_4 step_5 step_6 step_7 step_8 step_9 step_10 step_11
deadline=${BUDGET_S:-3600}  # seconds from the script's start (SECONDS), the set-up above included
for s in ${STEPS:-1 2 3 4 5 6 7 8 9 10 11}; do
  limit=${LIMIT[$s]}
  left=$((deadline - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    echo "step $s: not run (the budget is spent)" | tee -a "$out/steps.txt"
    continue
  fi
  echo "=== step $s (at most $limit s)"
  start=$SECONDS
  timeout -k 5 "$limit" bash -o pipefail -c "step_$s"
  echo "step $s: exit status $?, $((SECONDS - start)) s" | tee -a "$out/steps.txt"
done
