"""The decode path under torch.compile: captured once, equal to eager.

- One graph for every decode step: 75 steps at moving positions, in three row layouts (rows at the
  same and at different positions, one reaching the cache's last slot), for both attention and both
  expert implementations, counted with dynamo's CompileCounter backend (it counts graphs without
  generating code, so this is quick) and with recompilation made an error; and through generate(),
  prefill, decode and verification compiled once for prompts of every length up to the cache's end.
- Compiled with inductor (what generate(compile=True) runs): logits equal to eager for prefill and
  every decode step (float32, relative error < 1e-5: the compiled kernels sum in another order, and
  the experts run through a gathered static-shape path or the grouped operator), and the same
  generated tokens, speculative decoding included.
"""

import pytest
import torch
import torch._dynamo
from helpers import random_dsv3ref, rel_err, tiny_config
from torch._dynamo.testing import CompileCounter

from dsv3ref import generate
from dsv3ref.cli import build_parser
from dsv3ref.generate import compiled_steps


@pytest.mark.parametrize("attn_impl,moe_impl", [("absorb", "grouped"), ("absorb", "loop"), ("naive", "grouped"),
                                                ("naive", "loop")])
def test_decoding_compiles_to_one_graph_with_no_recompilation(attn_impl, moe_impl):
    torch._dynamo.reset()
    cfg = tiny_config()
    model = random_dsv3ref(cfg, seed=60, attn_impl=attn_impl, moe_impl=moe_impl)
    counter = CompileCounter()
    step = torch.compile(model, fullgraph=True, dynamic=False, backend=counter)
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        for starts in ([12, 12], [3, 30], [55, 31]):  # layouts of the rows over the cache; 55 + 24: its last slot
            cache = model.new_cache(2, 80)
            model(torch.randint(0, cfg.vocab_size, (2, 56)), cache, 0)  # eager prefill
            for i in range(25):
                step(torch.randint(0, cfg.vocab_size, (2, 1)), cache, torch.tensor(starts) + i)
    assert counter.frame_count == 1


def test_generation_compiles_each_step_once_for_every_prompt_length(monkeypatch):
    """generate(compile=True) through to the end of its cache, plain and speculative, then with other
    prompt lengths (same batch, same cache bucket): decode and verification stay one graph each, and
    prefill (dynamic in the number of positions) at most two; a third round compiles nothing."""
    torch._dynamo.reset()
    counters = []
    real = torch.compile

    def counting(fn, **kwargs):
        counters.append(CompileCounter())
        kwargs.pop("mode", None)
        return real(fn, **dict(kwargs, backend=counters[-1]))
    monkeypatch.setattr(torch, "compile", counting)
    model = random_dsv3ref(tiny_config(num_nextn_predict_layers=1, max_position_embeddings=64), seed=62,
                           attn_impl="absorb", moe_impl="grouped")
    rounds = [([[5, 9, 2, 7], [1, 2, 3]], [3, 1, 4]), ([[3, 1, 4, 1, 5, 9], [2, 6]], [2, 7, 1, 8, 2, 8, 1]),
              ([[2, 7, 1, 8, 2, 8, 1, 8, 2], [8]], [5, 3, 5, 8, 9])]
    counts = []
    for plain, spec in rounds:
        generate(model, plain, 64 - len(max(plain, key=len)), eos_token_id=[], compile=True)  # to the cache's end
        generate(model, [spec], 30, eos_token_id=[], compile=True, speculative=True)
        counts.append({name: c.frame_count for name, c in zip(("decode", "prefill", "verify"), counters, strict=True)})
    assert set(model.compiled_steps) == {"decode", "prefill", "verify"}
    assert counts[0]["decode"] == counts[1]["decode"] == 1 and counts[0]["verify"] == counts[1]["verify"] == 1, counts
    assert counts[1]["prefill"] <= 2 and counts[2] == counts[1], counts


@pytest.fixture(scope="module")
def model():
    """The model of the inductor tests, its three steps compiled here (no test depends on another's run)."""
    torch._dynamo.reset()
    model = random_dsv3ref(tiny_config(num_nextn_predict_layers=1), seed=61, attn_impl="absorb", moe_impl="grouped")
    generate(model, [[5, 9, 2, 7]], 3, eos_token_id=[], compile=True, speculative=True)
    return model


def test_generate_compiled_gives_the_eager_tokens_speculative_included(model):
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    eager = generate(model, prompts, 10, eos_token_id=[])
    assert generate(model, prompts, 10, eos_token_id=[], compile=True).tokens == eager.tokens
    spec = generate(model, prompts[:1], 10, eos_token_id=[], speculative=True, compile=True)
    assert spec.tokens == eager.tokens[:1]
    assert set(model.compiled_steps) == {"decode", "prefill", "verify"}
    assert build_parser().parse_args(["generate", "--prompt", "x", "--compile"]).compile


def test_compiled_logits_equal_eager_for_prefill_and_every_decode_step(model):
    steps = compiled_steps(model)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        eager_cache, compiled_cache = model.new_cache(2, 24), model.new_cache(2, 24)
        a = model.lm_head(model.hidden_states(ids[:, :12], eager_cache, 0))
        b = model.lm_head(steps["prefill"](ids[:, :12], compiled_cache, 0))
        assert rel_err(b, a) < 1e-5
        for p in range(12, 24):  # to the cache's last slot; batch 2: 6 expert assignments of 8, the grouped operator
            a = model(ids[:, p:p + 1], eager_cache, p)
            b = steps["decode"](ids[:, p:p + 1], compiled_cache, torch.tensor([p, p]))
            assert rel_err(b, a) < 1e-5, p
        eager_cache, compiled_cache = model.new_cache(1, 24), model.new_cache(1, 24)
        model(ids[:1, :12], eager_cache, 0)
        steps["prefill"](ids[:1, :12], compiled_cache, 0)
        for p in range(12, 16):  # batch 1: 3 assignments, the gathered static path
            a = model(ids[:1, p:p + 1], eager_cache, p)
            b = steps["decode"](ids[:1, p:p + 1], compiled_cache, torch.tensor([p]))
            assert rel_err(b, a) < 1e-5, p
