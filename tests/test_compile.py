"""The decode path under torch.compile: captured once, equal to eager.

- One graph for every decode step: 50 steps at moving positions, in two row layouts (rows at the
  same and at different positions), for both attention and both expert implementations, counted with
  dynamo's CompileCounter backend (it counts graphs without generating code, so this is quick) and with
  recompilation made an error.
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
        for starts in ([12, 12], [3, 30]):  # two layouts of the rows over the cache
            cache = model.new_cache(2, 80)
            model(torch.randint(0, cfg.vocab_size, (2, 31)), cache, 0)  # eager prefill
            for i in range(25):
                step(torch.randint(0, cfg.vocab_size, (2, 1)), cache, torch.tensor(starts) + i)
    assert counter.frame_count == 1


@pytest.fixture(scope="module")
def model():
    torch._dynamo.reset()
    return random_dsv3ref(tiny_config(num_nextn_predict_layers=1), seed=61, attn_impl="absorb", moe_impl="grouped")


def test_generate_compiled_gives_the_eager_tokens_speculative_included(model):
    prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    eager = generate(model, prompts, 10, eos_token_id=[])
    assert generate(model, prompts, 10, eos_token_id=[], compile=True).tokens == eager.tokens
    spec = generate(model, prompts[:1], 10, eos_token_id=[], speculative=True, compile=True)
    assert spec.tokens == eager.tokens[:1]
    assert set(model.compiled_steps) == {"decode", "prefill", "verify"}
    assert build_parser().parse_args(["generate", "--prompt", "x", "--compile"]).compile


def test_compiled_logits_equal_eager_for_prefill_and_every_decode_step(model):
    steps = compiled_steps(model)  # already compiled by the test above when run together
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        eager_cache, compiled_cache = model.new_cache(2, 24), model.new_cache(2, 24)
        a = model.lm_head(model.hidden_states(ids[:, :12], eager_cache, 0))
        b = model.lm_head(steps["prefill"](ids[:, :12], compiled_cache, 0))
        assert rel_err(b, a) < 1e-5
        for p in range(12, 20):  # batch 2: 6 expert assignments of 8 experts, the grouped operator (CPU)
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
