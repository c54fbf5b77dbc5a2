"""Absorbed MLA, the static cache and generation, against the naive path, full recomputation and HF.

Tolerances: float32 logits agree to a relative error (max |diff| / max |ref|) below 1e-5 -- the
paths differ only in the order of float32 sums; float64 naive vs absorbed agree below 1e-12.
"""

import pytest
import torch
from helpers import hf_model, random_dsv3ref, rel_err, tiny_config

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig, generate, kv_cache_bytes


def pair(cfg, seed=0, dtype=torch.float32, order="absorbed"):
    """The same random weights under attn_impl naive and absorb; the absorbed model computes every
    chunk in `order` ("absorbed": W^UK/W^UV folded even for prefill; "auto": the cheaper order)."""
    naive = random_dsv3ref(cfg, seed=seed).to(dtype)
    absorb = DeepseekV3(cfg, attn_impl="absorb").to(dtype).eval()
    absorb.load_state_dict(naive.state_dict())
    for layer in absorb.model.layers:
        layer.self_attn.order = order
    return naive, absorb


@pytest.mark.parametrize("order", ["absorbed", "auto"])
@pytest.mark.parametrize("changes", [dict(), dict(q_lora_rank=None, rope_scaling=None), dict(v_head_dim=28)])
def test_absorbed_matches_naive_on_prefill_and_every_decode_step(changes, order):
    cfg = tiny_config(**changes)
    naive, absorb = pair(cfg, order=order)
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        assert rel_err(absorb(ids), naive(ids)) < 1e-5  # no cache
        caches = naive.new_cache(2, 30), absorb.new_cache(2, 30)
        a = naive(ids[:, :20], caches[0], 0)
        b = absorb(ids[:, :20], caches[1], 0)
        assert rel_err(b, a) < 1e-5
        for p in range(20, 30):
            a = naive(ids[:, p:p + 1], caches[0], p)
            b = absorb(ids[:, p:p + 1], caches[1], p)
            assert rel_err(b, a) < 1e-5


def test_auto_order_absorbs_for_decode_and_expands_for_prefill():
    from dsv3ref.mla import absorbed_is_cheaper

    v3 = dict(r=512, h=128, dn=128, dr=64, dv=128)  # DeepSeek-V3's attention
    assert absorbed_is_cheaper(1, 4096, **v3) and absorbed_is_cheaper(4, 4096, **v3)
    assert not absorbed_is_cheaper(4096, 4096, **v3) and not absorbed_is_cheaper(1, 1, **v3)


@pytest.mark.parametrize("order", ["absorbed", "auto"])
def test_float64_naive_and_absorbed_agree_to_1e12(order):
    cfg = tiny_config()
    naive, absorb = pair(cfg, dtype=torch.float64, order=order)
    ids = torch.randint(0, cfg.vocab_size, (2, 25))
    with torch.no_grad():
        assert rel_err(absorb(ids), naive(ids)) < 1e-12


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_cached_decoding_equals_full_recompute(attn_impl):
    cfg = tiny_config()
    model = random_dsv3ref(cfg, seed=1, attn_impl=attn_impl)
    ids = torch.randint(0, cfg.vocab_size, (3, 26))
    with torch.no_grad():
        full = model(ids)  # (3, 26, vocab) without any cache
        cache = model.new_cache(3, 40)
        assert rel_err(model(ids[:, :11], cache, 0), full[:, :11]) < 1e-5
        for p in range(11, 26):
            assert rel_err(model(ids[:, p:p + 1], cache, p)[:, 0], full[:, p]) < 1e-5


def test_chunked_prefill_equals_one_prefill():
    cfg = tiny_config()
    model = random_dsv3ref(cfg, seed=2, attn_impl="absorb")
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        whole = model(ids, model.new_cache(2, 24), 0)
        cache = model.new_cache(2, 24)
        parts = torch.cat([model(ids[:, :7], cache, 0), model(ids[:, 7:16], cache, 7), model(ids[:, 16:], cache, 16)],
                          dim=1)
    assert rel_err(parts, whole) < 1e-5


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_cached_logits_match_hf_with_its_cache(attn_impl, tmp_path):
    cfg = tiny_config()
    hf = hf_model(cfg, tmp_path / "cfg", seed=4)
    hf.save_pretrained(tmp_path / "hf")
    ours = DeepseekV3.from_pretrained(tmp_path / "hf", attn_impl=attn_impl)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        out = hf(ids[:, :12], use_cache=True)
        cache = ours.new_cache(2, 20)
        assert rel_err(ours(ids[:, :12], cache, 0), out.logits) < 1e-5
        past = out.cache
        for p in range(12, 20):
            out = hf(ids[:, p:p + 1], cache=past, use_cache=True)
            past = out.cache
            assert rel_err(ours(ids[:, p:p + 1], cache, p), out.logits) < 1e-5


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
    from dsv3ref.generate import _filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(_filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # top_p=0.8: 0.5 alone is below 0.8, 0.5 + 0.3 reaches it -> keep the first two
    assert torch.isinf(_filter_logits(logits, 0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(_filter_logits(logits, 0, 0.81)).tolist() == [[False, False, False, True]]


def test_kv_cache_bytes_of_deepseek_v3_and_of_real_caches():
    cfg = ModelConfig.preset("deepseek-v3")
    per_token = kv_cache_bytes(cfg, 1, torch.bfloat16)
    assert per_token["mla"] == 61 * (512 + 64) * 2  # 70,272 bytes: "about 70 KB per token"
    assert per_token["naive"] == 61 * 128 * (192 + 128) * 2
    tiny = tiny_config()
    for impl, kind in (("absorb", "mla"), ("naive", "naive")):
        model = DeepseekV3(tiny, attn_impl=impl)
        cache = model.new_cache(3, 50, dtype=torch.float16)
        assert cache.nbytes == 3 * kv_cache_bytes(tiny, 50, torch.float16)[kind]


def test_cache_limits_are_clear_errors():
    cfg = tiny_config()
    model = random_dsv3ref(cfg, attn_impl="absorb")
    cache = model.new_cache(1, 10)
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    with pytest.raises(ValueError, match="positions up to 11 requested, but the cache holds max_seq_len=10"):
        model(ids, cache, start_pos=8)
    with pytest.raises(ValueError, match="cache: made for batch_size=1, input_ids has batch 2"):
        model(torch.zeros(2, 1, dtype=torch.long), cache, 0)
    with pytest.raises(ValueError, match="max_seq_len: found 129, expected at most max_position_embeddings=128"):
        model.new_cache(1, 129)
    with pytest.raises(ValueError, match="exceed max_position_embeddings=128"):
        model(ids, None, start_pos=126)
    naive = DeepseekV3(cfg)
    with pytest.raises(ValueError, match="found a 'latent' cache, attn_impl='naive' needs a 'full' one"):
        naive(ids, cache, 0)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=128"):
        generate(model, ids, max_new_tokens=125)
    with pytest.raises(ValueError, match="top_p: expected a value in"):
        generate(model, ids, 3, top_p=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="padding between tokens"):
        generate(model, torch.ones(1, 3, dtype=torch.long), 2, attention_mask=torch.tensor([[1, 0, 1]]))


def test_save_and_load_keep_working_with_absorb(tmp_path):
    cfg = tiny_config()
    model = random_dsv3ref(cfg, seed=11, attn_impl="absorb")
    dsv3ref.save_pretrained(model, tmp_path)
    again = DeepseekV3.from_pretrained(tmp_path, attn_impl="absorb")
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
