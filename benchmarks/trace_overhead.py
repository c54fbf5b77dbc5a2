"""What tracing costs: forward time of a model never traced, while traced, and after a trace.

    python benchmarks/trace_overhead.py [--preset small] [--tokens 128]

`dsv3ref.trace` attaches forward hooks for one call and removes them, so a model that is not being
traced runs exactly the code it ran before; the "after" column checks that.
"""

from __future__ import annotations

import argparse

import torch
from common import add_config_args, best_of, config_from_args, machine

import dsv3ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    torch.manual_seed(0)
    model = dsv3ref.DeepseekV3(cfg, attn_impl="absorb", moe_impl="grouped").eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens))
    print(f"machine: {machine()}")
    with torch.inference_mode():
        model(ids)  # warm-up
        before = best_of(lambda: model(ids), args.repeats)
        during = best_of(lambda: dsv3ref.trace(model, ids), args.repeats)
        after = best_of(lambda: model(ids), args.repeats)
    print(f"preset {args.preset!r}, {args.tokens} tokens: forward {1e3 * before:.1f} ms never traced, "
          f"{1e3 * during:.1f} ms while traced ({during / before:.2f}x), {1e3 * after:.1f} ms after a trace "
          f"({after / before:.2f}x)")


if __name__ == "__main__":
    main()
