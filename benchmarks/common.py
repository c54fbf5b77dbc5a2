"""Shared benchmark plumbing: a config from a preset plus command-line overrides, one random
checkpoint on disk that every contender loads, and a timer."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import dsv3ref


def add_config_args(parser: argparse.ArgumentParser, preset: str = "small") -> None:
    parser.add_argument("--preset", default=preset, help="ModelConfig preset (default: %(default)s)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override config fields, e.g. --set hidden_size=2048 num_hidden_layers=2")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, pinned for the whole run (default 1: the machine is shared)")


def config_from_args(args: argparse.Namespace) -> dsv3ref.ModelConfig:
    d = dsv3ref.ModelConfig.preset(args.preset).to_dict()
    for item in args.set:
        key, _, value = item.partition("=")
        d[key] = json.loads(value)
    return dsv3ref.ModelConfig.from_dict(d)


def write_random_checkpoint(cfg: dsv3ref.ModelConfig, folder: str, seed: int = 0) -> None:
    torch.manual_seed(seed)
    dsv3ref.save_pretrained(dsv3ref.DeepseekV3(cfg), folder)


def machine(device: str | torch.device = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.device(device).type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return text


def best_of(fn, repeats: int = 3, device: str | torch.device = "cpu") -> float:
    """Smallest wall time of `repeats` calls of fn(), in seconds (GPU work waited for)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best
