"""Prefill and decode speed: dsv3ref (absorbed and naive MLA) against HF transformers, same weights.

"dsv3ref absorb" is the fast path (attn_impl="absorb", moe_impl="grouped"); "dsv3ref naive" the
readable one (attn_impl="naive", moe_impl="loop").

    python benchmarks/decode.py                       # "small" preset, contexts 256 1024 4096
    python benchmarks/decode.py --contexts 512 --set hidden_size=2048

For each context length C: prefill a random prompt of C tokens into an empty cache (tokens/s),
then decode --decode-tokens tokens one at a time (ms/token). HF runs DeepseekV3ForCausalLM with its
default cache (which stores the latent but re-expands it through kv_b_proj at every step) and its
SDPA attention. Ratios > 1 mean dsv3ref is faster.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import add_config_args, config_from_args, machine, write_random_checkpoint

from dsv3ref import DeepseekV3


def run_dsv3ref(model: DeepseekV3, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    cache = model.new_cache(1, ids.shape[1] + steps)
    start = time.perf_counter()
    hidden = model.hidden_states(ids, cache, 0)
    token = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for p in range(ids.shape[1], ids.shape[1] + steps):
        token = model(token, cache, p)[:, -1].argmax(-1, keepdim=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--no-naive", action="store_true", help="skip dsv3ref's naive path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    from transformers import DeepseekV3ForCausalLM

    print(f"machine: {machine()}")
    print(f"config: preset {args.preset!r} {' '.join(args.set)}; hidden {cfg.hidden_size}, layers "
          f"{cfg.num_hidden_layers}, heads {cfg.num_attention_heads}, kv_lora_rank {cfg.kv_lora_rank}, "
          f"experts {cfg.n_routed_experts} (top-{cfg.num_experts_per_tok}); float32, batch 1")
    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(cfg, folder)
        models = {"dsv3ref absorb": DeepseekV3.from_pretrained(folder, attn_impl="absorb", moe_impl="grouped")}
        if not args.no_naive:
            models["dsv3ref naive"] = DeepseekV3.from_pretrained(folder, attn_impl="naive")
        models["HF transformers"] = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    rows = []
    with torch.inference_mode():
        for context in args.contexts:
            ids = torch.randint(0, cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
            result = {}
            for name, model in models.items():
                run = run_hf if name.startswith("HF") else run_dsv3ref
                run(model, ids[:, :32], 2)  # warm-up
                result[name] = run(model, ids, args.decode_tokens)
            rows.append((context, result))
            hf_prefill, hf_decode = result["HF transformers"]
            for name, (prefill, decode) in result.items():
                print(f"context {context:5d}  {name:16s} prefill {context / prefill:8.0f} tok/s "
                      f"({hf_prefill / prefill:4.2f}x HF)   decode {1e3 * decode:7.2f} ms/token "
                      f"({hf_decode / decode:5.2f}x HF)", flush=True)
    first, last = rows[0], rows[-1]
    for name in models:
        growth = last[1][name][1] / first[1][name][1]
        print(f"{name:16s} decode time grows {growth:5.2f}x from context {first[0]} to {last[0]}")


if __name__ == "__main__":
    main()
