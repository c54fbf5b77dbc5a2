"""Generation: greedy decoding against HF's generate, batches of mixed lengths, EOS per row,
seeded sampling and its filters."""

import pytest
import torch
from helpers import hf_model, random_dsv3ref, tiny_config

from dsv3ref import DeepseekV3, generate
from dsv3ref.sampling import filter_logits


@pytest.mark.parametrize("seed,changes", [(5, dict()), (6, dict(q_lora_rank=None, n_group=1, topk_group=1)),
                                          (7, dict(first_k_dense_replace=0, num_hidden_layers=2))])
def test_greedy_generation_equals_hf_generate(seed, changes, tmp_path):
    cfg = tiny_config(**changes)
    hf = hf_model(cfg, tmp_path / "cfg", seed=seed)
    hf.save_pretrained(tmp_path / "hf")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ours = DeepseekV3.from_pretrained(tmp_path / "hf", attn_impl="absorb")
    prompts = torch.randint(0, cfg.vocab_size, (3, 9))
    with torch.no_grad():
        expected = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                               max_new_tokens=20)[:, 9:]
    got = generate(ours, prompts, max_new_tokens=20, eos_token_id=[])
    assert got.tokens == expected.tolist()


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_mixed_length_batch_equals_each_prompt_alone(attn_impl):
    cfg = tiny_config()
    model = random_dsv3ref(cfg, seed=8, attn_impl=attn_impl)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 1, 9)]
    batch = generate(model, prompts, max_new_tokens=15, eos_token_id=[])
    for prompt, tokens in zip(prompts, batch.tokens, strict=True):
        assert generate(model, [prompt], max_new_tokens=15, eos_token_id=[]).tokens[0] == tokens
    # the same prompts given as a left-padded tensor with an attention mask
    ids = torch.zeros(4, 17, dtype=torch.long)
    mask = torch.zeros(4, 17, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 17 - len(p):] = torch.tensor(p)
        mask[b, 17 - len(p):] = 1
    assert generate(model, ids, 15, eos_token_id=[], attention_mask=mask).tokens == batch.tokens


def test_generation_stops_on_eos_per_row_and_streams():
    cfg = tiny_config()
    model = random_dsv3ref(cfg, seed=9, attn_impl="absorb")
    prompts = torch.randint(0, cfg.vocab_size, (3, 5))
    free = generate(model, prompts, 12, eos_token_id=[])
    stop = free.tokens[0][3]
    seen = []
    out = generate(model, prompts, 12, eos_token_id=stop, stream=seen.append)
    for b in range(3):
        row = free.tokens[b]
        expected = row[: row.index(stop) + 1] if stop in row else row
        assert out.tokens[b] == expected
        assert out.finished[b] == (stop in row)
    assert [s[0] for s in seen][: len(out.tokens[0])] == out.tokens[0]
    assert all(s[0] is None for s in seen[len(out.tokens[0]):])


def test_sampling_is_reproducible_with_a_seed_and_filters_work():
    cfg = tiny_config()
    model = random_dsv3ref(cfg, seed=10, attn_impl="absorb")
    prompts = torch.randint(0, cfg.vocab_size, (2, 6))
    a = generate(model, prompts, 20, temperature=1.0, seed=123, eos_token_id=[])
    b = generate(model, prompts, 20, temperature=1.0, seed=123, eos_token_id=[])
    c = generate(model, prompts, 20, temperature=1.0, seed=124, eos_token_id=[])
    greedy = generate(model, prompts, 20, eos_token_id=[])
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != greedy.tokens
    # top_k=1 and a tiny top_p leave only the argmax: sampling becomes greedy
    assert generate(model, prompts, 20, temperature=0.7, top_k=1, seed=1, eos_token_id=[]).tokens == greedy.tokens
    assert generate(model, prompts, 20, temperature=2.0, top_p=1e-6, seed=1, eos_token_id=[]).tokens == greedy.tokens


def test_top_k_top_p_sample_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # top_p=0.8: 0.5 alone is below 0.8, 0.5 + 0.3 reaches it -> keep the first two
    assert torch.isinf(filter_logits(logits, 0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.81)).tolist() == [[False, False, False, True]]
