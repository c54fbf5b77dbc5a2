"""Command line: `python -m dsv3ref demo | compare`."""

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
    print(f"tiny preset (random weights, untrained): {tiny.total:,} parameters + {tiny.mtp:,} in its MTP module, "
          f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} routed experts")
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


def compare_cmd(args: argparse.Namespace) -> int:
    """Trace dsv3ref's readable path and another implementation on the same checkpoint; print where
    they diverge."""
    from dsv3ref.oracle import compare, trace, trace_hf

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    reference = DeepseekV3.from_pretrained(args.ckpt, dtype=dtype)
    cfg = reference.config
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=generator)
    if args.against == "hf":
        from transformers import DeepseekV3ForCausalLM

        other = DeepseekV3ForCausalLM.from_pretrained(args.ckpt, dtype=dtype, attn_implementation="eager").eval()
        other_trace = trace_hf(other, ids)
    else:
        other = DeepseekV3.from_pretrained(args.ckpt, dtype=dtype, attn_impl="absorb", moe_impl="grouped")
        other_trace = trace(other, ids)
    result = compare(trace(reference, ids), other_trace, rtol=args.rtol, atol=args.atol)
    print(f"reference: dsv3ref (naive, loop, {args.dtype}); other: {args.against}; input {tuple(ids.shape)}, "
          f"seed {args.seed}; tolerance atol {args.atol} + rtol {args.rtol} * max|ref|")
    print(result)
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv3ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the embedded tiny model end to end")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    p = sub.add_parser("compare", help="trace dsv3ref and another implementation on a checkpoint, find the first "
                                       "divergence")
    p.add_argument("ckpt", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--against", choices=["hf", "fast"], default="hf",
                   help="hf: transformers' DeepseekV3ForCausalLM; fast: dsv3ref's absorb + grouped path")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=0.0)
    p.set_defaults(func=compare_cmd)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
