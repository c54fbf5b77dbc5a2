"""Prefill and decode speed: dsv3ref (absorbed and naive MLA, eager and compiled) against HF transformers,
same weights, with the weight-streaming floor of this machine.

"dsv3ref absorb" is the fast path (attn_impl="absorb", moe_impl="grouped"); "dsv3ref naive" the
readable one (attn_impl="naive", moe_impl="loop"); "... compiled" runs the same model through
generate(compile=True)'s compiled steps (dsv3ref.generate.compiled_steps).

    python benchmarks/decode.py                                  # "small" preset, contexts 256 1024 4096
    python benchmarks/decode.py --compile --batch 1 8 --contexts 256 1024
    python benchmarks/decode.py --contexts 512 --set hidden_size=2048

For each context length C and batch size B: prefill B random prompts of C tokens into an empty cache
(tokens/s), then decode --decode-tokens tokens one at a time (ms per step). HF runs
DeepseekV3ForCausalLM with its default cache (which stores the latent but re-expands it through
kv_b_proj at every step) and its SDPA attention; with --compile also with a StaticCache and
torch.compile(fullgraph=True) over its forward, as its documentation describes compiled decoding.
Ratios > 1 mean faster than HF's eager decoding. Contenders run interleaved, one run each per round
(--repeats rounds, after a warm-up); each row reports the median, and the range of the decode times
in brackets. One thread unless --threads says more: the machine is shared.

The floor: a decode step must read every weight it uses once, so the weight bytes a step activates
(attention, dense and shared FFNs, the routed experts its tokens choose, norms, the head; not the
embedding table) divided by this machine's read bandwidth (a best-of-5 sum over 1 GiB, measured in the
same run) bounds the step time from below. For batch B the step reads at most B * top-k experts per
MoE layer; the floor counts that many (capped at all experts).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial

import torch
from common import add_config_args, best_of, config_from_args, machine, write_random_checkpoint

from dsv3ref import DeepseekV3, count_parameters
from dsv3ref.generate import compiled_steps


def run_dsv3ref(model: DeepseekV3, ids: torch.Tensor, steps: int, compiled: bool = False) -> tuple[float, float]:
    b = ids.shape[0]
    cache = model.new_cache(b, ids.shape[1] + steps)
    run = compiled_steps(model) if compiled else {"prefill": model.hidden_states, "decode": model}
    start = time.perf_counter()
    hidden = run["prefill"](ids, cache, 0)
    token = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for p in range(ids.shape[1], ids.shape[1] + steps):
        token = run["decode"](token, cache, torch.full((b,), p))[:, -1].argmax(-1, keepdim=True)
    return prefill, (time.perf_counter() - start) / steps


def run_hf(model, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill = time.perf_counter() - start
    past = out.cache
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, cache=past, use_cache=True)
        past = out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, (time.perf_counter() - start) / steps


def hf_compiled(model):
    """HF's compiled static-cache decoding: a StaticCache and torch.compile over the forward."""
    from transformers import StaticCache

    forward = torch.compile(model.forward, fullgraph=True)

    def run(ids: torch.Tensor, steps: int) -> tuple[float, float]:
        b, t = ids.shape
        cache = StaticCache(config=model.config, max_cache_len=t + steps)
        start = time.perf_counter()  # the prefill through the compiled forward too (compiled per prompt shape)
        out = forward(ids, cache=cache, use_cache=True, cache_position=torch.arange(t), logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for p in range(t, t + steps):
            out = forward(token, cache=cache, use_cache=True, cache_position=torch.tensor([p]))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, (time.perf_counter() - start) / steps

    return run


def read_bandwidth() -> float:
    """Bytes per second this process reads from memory: the best of 5 sums over 1 GiB of float32."""
    x = torch.ones(2**28)
    return x.numel() * 4 / best_of(lambda: x.sum(), repeats=5)


def step_weight_bytes(cfg, batch: int, bytes_per_value: int = 4) -> int:
    """Weight bytes one decode step reads: everything but the embedding table and the unchosen routed
    experts (at most batch * top-k experts per MoE layer)."""
    count = count_parameters(cfg)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    read_experts = min(cfg.n_routed_experts, batch * cfg.num_experts_per_tok)
    idle = n_moe * (cfg.n_routed_experts - read_experts) * count.routed_expert
    return (count.total - count.embedding - idle) * bytes_per_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--no-naive", action="store_true", help="skip dsv3ref's naive path")
    parser.add_argument("--compile", action="store_true", help="add dsv3ref's and HF's compiled decoding")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds per row, contenders interleaved; the median is reported, the range beside")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bandwidth = read_bandwidth()
    print(f"machine: {machine()}; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"config: preset {args.preset!r} {' '.join(args.set)}; hidden {cfg.hidden_size}, layers "
          f"{cfg.num_hidden_layers}, heads {cfg.num_attention_heads}, kv_lora_rank {cfg.kv_lora_rank}, "
          f"experts {cfg.n_routed_experts} (top-{cfg.num_experts_per_tok}); float32")
    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(cfg, folder)
        absorb = DeepseekV3.from_pretrained(folder, attn_impl="absorb", moe_impl="grouped")
        runs = {"dsv3ref absorb": partial(run_dsv3ref, absorb)}
        if args.compile:
            runs["dsv3ref absorb compiled"] = partial(run_dsv3ref, absorb, compiled=True)
        if not args.no_naive:
            runs["dsv3ref naive"] = partial(run_dsv3ref, DeepseekV3.from_pretrained(folder, attn_impl="naive"))
        hf = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        runs["HF transformers"] = partial(run_hf, hf)
        if args.compile:
            runs["HF compiled static"] = hf_compiled(hf)

    rows = []
    with torch.inference_mode():
        for batch in args.batch:
            floor = step_weight_bytes(cfg, batch) / bandwidth
            print(f"batch {batch}: a decode step reads {step_weight_bytes(cfg, batch) / 1e6:.0f} MB of weights: "
                  f"floor {1e3 * floor:.2f} ms per step")
            for context in args.contexts:
                g = torch.Generator().manual_seed(context)
                ids = torch.randint(0, cfg.vocab_size, (batch, context), generator=g)
                for name, run in list(runs.items()):
                    try:
                        # warm-up; compiled rows compile for these very shapes (a static graph per cache size)
                        run(*((ids, args.decode_tokens) if "compiled" in name else (ids[:, :32], 2)))
                    except Exception as e:  # a contender that cannot run here says why, once
                        print(f"{name}: cannot run ({type(e).__name__}: {str(e).splitlines()[0][:150]})")
                        del runs[name]
                # interleaved: every round runs each contender once (A, B, C, A, B, C, ...), so a machine
                # that gets busier or quieter during the measurement weighs on all of them alike
                times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
                for _ in range(args.repeats):
                    for name, run in runs.items():
                        times[name].append(run(ids, args.decode_tokens))
                result = {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
                          for name, ts in times.items()}
                rows.append((batch, context, result))
                hf_prefill, hf_decode = result["HF transformers"]
                for name, (prefill, decode) in result.items():
                    spread = [1e3 * t[1] for t in times[name]]
                    print(f"batch {batch} context {context:5d}  {name:24s} "
                          f"prefill {batch * context / prefill:8.0f} tok/s "
                          f"({hf_prefill / prefill:4.2f}x HF)   decode {1e3 * decode:7.2f} ms/step "
                          f"[{min(spread):.2f}-{max(spread):.2f}] "
                          f"({hf_decode / decode:5.2f}x HF, {decode / floor:4.1f}x the floor)", flush=True)


if __name__ == "__main__":
    main()
