"""What tracing costs: forward time of a model never traced, of an identical model while it is
traced, and of that model after its trace (timings interleaved, best of --repeats).

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
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    torch.manual_seed(0)
    untraced = dsv3ref.DeepseekV3(cfg, attn_impl="absorb", moe_impl="grouped").eval()
    traced = dsv3ref.DeepseekV3(cfg, attn_impl="absorb", moe_impl="grouped").eval()
    traced.load_state_dict(untraced.state_dict())  # the same weights; only `traced` is ever traced
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens))
    print(f"machine: {machine()}")
    times = {"before": float("inf"), "during": float("inf"), "after": float("inf")}
    with torch.inference_mode():
        untraced(ids), traced(ids)  # warm-up
        for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits all three alike
            times["before"] = min(times["before"], best_of(lambda: untraced(ids), 1))
            times["during"] = min(times["during"], best_of(lambda: dsv3ref.trace(traced, ids), 1))
            times["after"] = min(times["after"], best_of(lambda: traced(ids), 1))
    before, during, after = times["before"], times["during"], times["after"]
    print(f"preset {args.preset!r}, {args.tokens} tokens: forward {1e3 * before:.1f} ms never traced, "
          f"{1e3 * during:.1f} ms while traced ({during / before:.2f}x), {1e3 * after:.1f} ms after a trace "
          f"({after / before:.2f}x)")


if __name__ == "__main__":
    main()
