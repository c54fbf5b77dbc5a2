"""Command line: `python -m dsv3ref demo`."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from dsv3ref import DeepseekV3, ModelConfig, count_parameters, save_pretrained


def demo(args: argparse.Namespace) -> int:
    """Build the embedded tiny model, run it, save and reload it; report DeepSeek-V3's size."""
    full = count_parameters(ModelConfig.preset("deepseek-v3"))
    print(f"DeepSeek-V3 (published config): {full.total / 1e9:.1f}B parameters, "
          f"{full.activated / 1e9:.1f}B activated per token, MTP module {full.mtp / 1e9:.1f}B")
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(args.seed)
    model = DeepseekV3(cfg).eval()
    tiny = count_parameters(cfg)
    print(f"tiny preset (random weights, untrained): {tiny.total:,} parameters, {cfg.num_hidden_layers} layers, "
          f"{cfg.n_routed_experts} routed experts")
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    print(f"forward of {tuple(ids.shape)} token ids -> logits {tuple(logits.shape)} "
          f"in {1e3 * (time.perf_counter() - start):.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        again = DeepseekV3.from_pretrained(tmp)
        with torch.no_grad():
            same = torch.equal(again(ids), logits)
    print(f"save_pretrained -> from_pretrained reproduces the logits bit for bit: {same}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv3ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the embedded tiny model end to end")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
