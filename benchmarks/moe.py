"""One MoE layer: dsv3ref's per-expert loop and grouped GEMM against HF transformers' experts.

    python benchmarks/moe.py        # the "small" preset's MoE layer, a wider one, one with 256 experts
    python benchmarks/moe.py --tokens 4096 --set n_routed_experts=64
    python benchmarks/moe.py --device cuda --dtype bfloat16 --tokens 512 4096 16384

All contenders load the same random checkpoint (one MoE layer). HF runs DeepseekV3MoE with its
"eager" experts (a loop over the experts that received tokens) and its "grouped_mm" experts.
Ratios are tokens/s relative to HF's faster implementation at that batch size.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import add_config_args, best_of, config_from_args, machine, write_random_checkpoint

from dsv3ref import DeepseekV3

WIDE = ["hidden_size=2048", "n_routed_experts=64", "num_experts_per_tok=8", "moe_intermediate_size=1024",
        "n_group=8", "topk_group=4"]
# DeepSeek-V3's routing shape (256 experts, 8 chosen within 4 of 8 groups) on a small hidden size.
MANY = ["n_routed_experts=256", "num_experts_per_tok=8", "n_group=8", "topk_group=4", "moe_intermediate_size=256"]


def layers(folder, device, dtype):
    from transformers import DeepseekV3ForCausalLM

    out = {}
    for impl in ("loop", "grouped"):
        model = DeepseekV3.from_pretrained(folder, moe_impl=impl, dtype=dtype, device=device)
        out[f"dsv3ref {impl}"] = model.model.layers[0].mlp
    if torch.device(device).type != "cpu":  # the CPU's runs of 2,048 assignments, against one run of all
        model = DeepseekV3.from_pretrained(folder, moe_impl="grouped", dtype=dtype, device=device)
        model.model.layers[0].mlp.experts.block_rows = 2048
        out["dsv3ref grouped/2048"] = model.model.layers[0].mlp
    for impl in ("eager", "grouped_mm"):
        hf = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation=impl)
        out[f"HF {impl}"] = hf.to(device).eval().model.layers[0].mlp
    return out


def bench(args, overrides, title):
    args.set = overrides
    cfg = config_from_args(args).replace(num_hidden_layers=1, first_k_dense_replace=0)
    print(f"\n{title}: hidden {cfg.hidden_size}, {cfg.n_routed_experts} experts of width "
          f"{cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok} in {cfg.topk_group} of {cfg.n_group} groups, "
          f"{cfg.n_shared_experts} shared; {args.dtype} on {args.device}")
    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(cfg, folder)
        mods = layers(folder, args.device, getattr(torch, args.dtype))
    with torch.inference_mode():
        for n in args.tokens:
            x = torch.randn(1, n, cfg.hidden_size, generator=torch.Generator().manual_seed(n))
            x = x.to(device=args.device, dtype=getattr(torch, args.dtype))
            ref = mods["dsv3ref loop"](x)
            times = {}
            for name, mod in mods.items():
                out = mod(x)
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                assert err < (1e-4 if args.dtype == "float32" else 2e-2), f"{name} disagrees with the loop: {err}"
                times[name] = best_of(lambda mod=mod, x=x: mod(x), repeats=args.repeats, device=args.device)
            best_hf = min(t for k, t in times.items() if k.startswith("HF"))
            for name, t in times.items():
                print(f"tokens {n:5d}  {name:16s} {n / t:10.0f} tok/s   {best_hf / t:5.2f}x best HF")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 512, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine(args.device)}")
    given = list(args.set)
    bench(args, given, f"preset {args.preset!r} {' '.join(given)}")
    if not given:
        bench(args, WIDE, "wider: " + " ".join(WIDE))
        bench(args, MANY, "V3-shaped routing: " + " ".join(MANY))


if __name__ == "__main__":
    main()
