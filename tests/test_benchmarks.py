"""The benchmarks run: each script at its smallest settings, checked for the lines it must print.

They measure, and CI asserts no timing; this only keeps them working (a benchmark that no longer starts
was found once: benchmarks/train_step.py passed an argument from_pretrained does not take). moe.py is
left out: its smallest run builds a 2 GB layer (50 s here).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "train_step": (["--preset", "tiny", "--batch", "2", "--seq", "8", "--repeats", "1"],
                   [r"dsv3ref main loss .* HF's speed on the same work", r"dsv3ref main, grouped .* HF's speed",
                    r"dsv3ref main, absorb .* HF's speed", r"dsv3ref main, absorb \+ grouped .* HF's speed",
                    r"MTP adds .* its share", r"dsv3ref FP8 main \+ MTP .* the float32 step's time, .* its floor",
                    r"dsv3ref FP8 main \+ MTP, dequantize .* the float32 step's time",
                    r"float64 GEMMs main \+ MTP .* the float32 step's time"]),
    "full_width": (["--device", "cpu", "--preset", "small", "--layers", "2", "--batch", "1", "--seq-len", "24",
                    "--prompt", "8", "--decode-steps", "2", "--rounds", "1", "--kernel", "scaled_mm"],
                   [r"bfloat16 activations .* scaled_mm against emulate: logits", r"first divergence: ",
                    r"emulate / scaled_mm = ", r"generate: 1 x 22 prompt tokens", r"plan: weights "]),
    "fp8_gemm": (["--tokens", "1", "--repeats", "1", "--shapes", "q_a_proj"],
                 [r"q_a_proj .* dsv3ref emulate .* dense", r"q_a_proj .* dsv3ref dequantize .* dense",
                  r"q_a_proj .* dsv3ref scaled_mm \(rowwise\)"]),
    "decode": (["--contexts", "32", "--decode-tokens", "2", "--repeats", "1"],
               [r"dsv3ref absorb .* prefill .* decode .* the floor", r"HF transformers .* decode"]),
    "trace_overhead": (["--tokens", "8", "--repeats", "1"], [r"while traced \(.*x\), .* after a trace"]),
    "io": (["--layers", "1", "--shard-mib", "16", "--rounds", "1"],
           [r"dsv3ref from_pretrained .* its floor, .* HF's speed", r"convert bf16-to-fp8 .* its floor",
            r"convert fp8-to-bf16 .* its floor"]),
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs_and_prints_its_rows(script, tmp_path):
    args, expected = RUNS[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for pattern in expected:
        assert re.search(pattern, run.stdout), f"{script}: no line matching {pattern!r} in\n{run.stdout[-3000:]}"
