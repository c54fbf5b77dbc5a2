"""DeepSeek-V3 at its real width on one device: a few full-size layers, as a launch runs them.

The released model does not fit one GPU, but a few of its layers do: the embedding and the head, the
first --layers of the release (the first three are dense, the rest MoE layers of 256 FP8 experts), at
DeepSeek-V3's widths (hidden 7168, 128 heads), allocated as a launch allocates the release
(`dsv3ref.checkpoint.Headers.of_release`: FP8 weights kept, bfloat16 elsewhere, fp8_kernel and
moe_impl "auto") and filled with random values of the release's scale. It measures:

1. the FP8 GEMM kernel the device gets against the exact emulation on this model: the logits of one
   prompt (relative difference, and whether the greedy token agrees), and a decode step's time at
   batch 1 with each (ratio, interleaved round by round);
2. the planner on a real device: the bytes allocated after loading, and the peak of
   torch.cuda.max_memory_allocated over `generate` (--batch prompts of --seq-len tokens, prefilled
   --prefill-chunk tokens a pass, then --decode-steps tokens each), against `dsv3ref.plan` for the
   same model (reserve 0: torch's allocator only).

    python3 benchmarks/full_width.py --device cuda                      # 4 layers, 32 x 4096 (an H200)
    python3 benchmarks/full_width.py --device cpu --preset small --batch 2 --seq-len 64   # a smoke run
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine

from dsv3ref import DeepseekV3, ModelConfig, compare, trace
from dsv3ref.checkpoint import Headers, load_pretrained
from dsv3ref.fp8 import E4M3, FP8Linear
from dsv3ref.generate import generate
from dsv3ref.parallel.planner import GIB, plan


def fill(model: DeepseekV3, seed: int) -> None:
    """Random values of the release's scale: FP8 codes spread over the E4M3 range with block scales
    making weights of standard deviation about 0.02, bf16 weights N(0, 0.02), norms 1, biases 0."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype == E4M3:
                for row in t.split(1024):  # in slices: a float32 copy of a whole tensor is not needed
                    row.copy_((torch.randn(row.shape, generator=g, device=row.device) * 100).clamp(-448, 448).to(E4M3))
            elif name.endswith("weight_scale_inv"):
                t.fill_(2e-4)
            elif name.endswith("norm.weight") or "layernorm" in name:
                t.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                t.zero_()
            else:
                for row in t.split(8192):
                    row.copy_(torch.randn(row.shape, generator=g, device=row.device) * 0.02)


def kernel_of(model: DeepseekV3) -> str:
    return next(m.kernel for m in model.modules() if isinstance(m, FP8Linear))


def set_kernel(model: DeepseekV3, kernel: str) -> None:
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.kernel = kernel


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_kernels(model: DeepseekV3, prompt: torch.Tensor, kernel: str, reference: str, label: str,
                    table: bool) -> None:
    """The model's trace of `prompt` with each FP8 kernel: the logits at the last position (relative
    difference in norm, greedy token), routing flips, and with table=True every traced point."""
    traces = {}
    for k in (kernel, reference):
        set_kernel(model, k)
        traces[k] = trace(model, prompt)
    a, b = (traces[k]["lm_head"][0, -1].float() for k in (kernel, reference))
    result = compare(traces[reference], traces[kernel], rtol=2e-2)
    print(f"{label}, {kernel} against {reference}: logits at the prompt's last position differ by "
          f"{((a - b).norm() / b.norm()).item():.2e} (relative, in norm), greedy token equal: "
          f"{bool(a.argmax() == b.argmax())}; tokens routed to other experts: {sum(result.routing_flips.values())}")
    if table:
        print(f"every traced point ({prompt.shape[1]} tokens; errors relative to each point's largest value):")
        print(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="deepseek-v3", help="deepseek-v3, or small (FP8 layout) for a smoke run")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept (default: 3 dense + 1 MoE)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512, help="tokens of the kernel comparison's prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernel", choices=["scaled_mm"], help="compare this kernel with the emulation "
                        "(default: what fp8_kernel='auto' picks; scaled_mm on a CPU compares torch's CPU kernel)")
    args = parser.parse_args()
    device = torch.device(args.device)
    release = ModelConfig.preset("deepseek-v3")
    cfg = ModelConfig.preset(args.preset).replace(num_hidden_layers=args.layers, num_nextn_predict_layers=0,
                                                  quantization_config=release.quantization_config)
    print(f"{machine(device)}; {args.preset} widths, {args.layers} layers "
          f"({sum(cfg.is_moe_layer(i) for i in range(args.layers))} MoE), bfloat16")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = load_pretrained(DeepseekV3, Headers.of_release(cfg), dtype=torch.bfloat16, device=device,
                            attn_impl="absorb", moe_impl="auto", gemm_impl="fp8", fp8_kernel="auto",
                            check_finite_values=False, progress=False)
    loaded = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else None
    fill(model, seed=0)
    auto = kernel_of(model)
    print(f"implementation: {model.impl}")

    # 1. the device's kernel against the exact emulation
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g).to(device)
    kernels = list(dict.fromkeys((args.kernel or auto, "emulate")))
    if len(kernels) > 1:
        compare_kernels(model, prompt, *kernels, "bfloat16 activations (as a launch runs)", table=False)
        # in float32 the activations are not rounded to bf16 between layers: what is left is the kernels'
        # own difference (and the FP8 requantization of activations it may tip over a rounding boundary)
        model.to(torch.float32)
        compare_kernels(model, prompt, *kernels, "float32 activations", table=True)
        model.to(torch.bfloat16)  # bf16 -> float32 -> bf16 is exact
        for m in model.modules():
            if isinstance(m, FP8Linear):
                m._derived.clear()  # the float32 copies of dequantized weights: not what a launch holds
    fast = kernels[0]
    if fast != "emulate":
        times: dict[str, list[float]] = {fast: [], "emulate": []}
        for _ in range(args.rounds):
            for kernel in times:
                set_kernel(model, kernel)
                sync(device)
                start = time.perf_counter()
                generate(model, prompt[:, :16].tolist(), 4, eos_token_id=[])
                sync(device)
                times[kernel].append((time.perf_counter() - start) / 5)
        best = {k: min(v) for k, v in times.items()}
        print(f"batch 1, a step (prefill of 16 tokens and 4 decode steps, per pass): {fast} "
              f"{1e3 * best[fast]:.1f} ms, emulate {1e3 * best['emulate']:.1f} ms: emulate / {fast} = "
              f"{best['emulate'] / best[fast]:.1f}x")
    set_kernel(model, auto)

    # 2. the planner against the device's allocator
    p = plan(cfg, 1, "tp", "fp8", 1e6, args.batch, args.seq_len, args.prefill_chunk, reserve=0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len - args.decode_steps), generator=g).tolist()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    out = generate(model, ids, args.decode_steps, eos_token_id=[], prefill_chunk=args.prefill_chunk)
    sync(device)
    elapsed = time.perf_counter() - start
    step = out.stats["decode_seconds"] / args.decode_steps
    print(f"generate: {args.batch} x {args.seq_len - args.decode_steps} prompt tokens, {args.decode_steps} new each: "
          f"prefill {out.stats['prefill_seconds']:.2f} s, decode {1e3 * step:.1f} ms a step "
          f"({args.batch / step:.0f} tokens/s); {elapsed:.2f} s in all")
    print(f"plan: weights {p.weights / GIB:.3f} GiB, derived {p.derived / GIB:.3f}, cache {p.cache / GIB:.3f}, "
          f"activations {p.activations / GIB:.3f}; in all {p.used / GIB:.3f} GiB")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
        print(f"allocated after loading {loaded / GIB:.3f} GiB (plan / allocated = {p.weights / loaded:.4f}); "
              f"peak over generate {peak / GIB:.3f} GiB (plan / peak = {p.used / peak:.3f})")


if __name__ == "__main__":
    main()
