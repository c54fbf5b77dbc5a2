"""Generation: greedy decoding against HF's generate, batches of mixed lengths, EOS per row,
seeded sampling and its filters."""

import math

import pytest
import torch
from helpers import hf_model, random_dsv3ref, tiny_config

from dsv3ref import DeepseekV3, generate
from dsv3ref.sampling import Sampler, filter_logits


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


def _probs_by_hand(row: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The sampling distribution written out in float64: logits / T, keep the top_k largest (0: all),
    then the smallest set of the most likely whose probability (after top-k, renormalized) reaches
    top_p, then the softmax over what is kept."""
    z = [x / temperature for x in row]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    kept = order[:top_k] if top_k else order
    mass = [math.exp(z[i] - z[kept[0]]) for i in kept]
    total = sum(mass)
    chosen, above = [], 0.0
    for i, m in zip(kept, mass, strict=True):
        if above >= top_p:  # the probability ranked above this token already reaches top_p
            break
        chosen.append(i)
        above += m / total
    norm = sum(math.exp(z[i] - z[kept[0]]) for i in chosen)
    return [math.exp(z[i] - z[kept[0]]) / norm if i in chosen else 0.0 for i in range(len(z))]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.6)])
def test_sampler_probabilities_equal_softmax_of_filtered_logits_over_t_by_hand(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 10, generator=g) * 2  # distinct values: no ties at the cut
    got = Sampler(temperature, top_k, top_p, generator=None).probs(logits)
    for row in range(3):
        expected = _probs_by_hand(logits[row].tolist(), temperature, top_k, top_p)
        assert got[row].tolist() == pytest.approx(expected, abs=1e-6)  # float32 softmax: 1e-7 relative
    # the temperature matters where the filter cuts by probability: T = 2 keeps more tokens than T = 0.5
    if top_p < 1:
        kept = [int((Sampler(t, top_k, top_p, None).probs(logits) > 0).sum()) for t in (0.5, 2.0)]
        assert kept[0] < kept[1], kept
