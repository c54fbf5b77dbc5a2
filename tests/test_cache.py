"""The static KV cache: cached decoding against full recomputation and HF's cache, its size, and
its limits as clear errors."""

import pytest
import torch
from helpers import hf_model, random_dsv3ref, rel_err, tiny_config

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig, generate, kv_cache_bytes


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


def test_kv_cache_bytes_of_deepseek_v3_and_of_real_caches():
    cfg = ModelConfig.preset("deepseek-v3")
    per_token = kv_cache_bytes(cfg, 1, torch.bfloat16)
    assert per_token["absorb"] == 61 * (512 + 64) * 2  # 70,272 bytes: "about 70 KB per token"
    assert per_token["naive"] == 61 * 128 * (192 + 128) * 2
    tiny = tiny_config()
    for impl in ("absorb", "naive"):
        model = DeepseekV3(tiny, attn_impl=impl)
        cache = model.new_cache(3, 50, dtype=torch.float16)
        assert cache.nbytes == 3 * kv_cache_bytes(tiny, 50, torch.float16)[impl]


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
    with pytest.raises(ValueError, match="cache: made for attn_impl='absorb', this model computes attn_impl='naive'"):
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
