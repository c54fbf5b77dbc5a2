"""Parameter counts against the published figures and a closed-form count written here."""

import pytest
from helpers import tiny_config

import dsv3ref
from dsv3ref import ModelConfig


def closed_form(cfg: ModelConfig) -> dict:
    """Count every weight matrix by hand from the config."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = d * h * cfg.qk_head_dim
    else:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn = q + kv + h * cfg.v_head_dim * d
    expert = 3 * d * cfg.moe_intermediate_size
    dense_layer = attn + 3 * d * cfg.intermediate_size + 2 * d
    moe_layer = attn + (cfg.n_routed_experts + cfg.n_shared_experts) * expert + cfg.n_routed_experts * d + 2 * d
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_dense = cfg.num_hidden_layers - n_moe
    emb = cfg.vocab_size * d
    total = emb * (1 if cfg.tie_word_embeddings else 2) + n_dense * dense_layer + n_moe * moe_layer + d
    activated = total - n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    mtp = cfg.num_nextn_predict_layers * (3 * d + 2 * d * d + moe_layer)
    return dict(total=total, activated=activated, mtp=mtp, dense_layer=dense_layer, moe_layer=moe_layer)


def test_deepseek_v3_count_is_the_published_671b():
    count = dsv3ref.count_parameters(ModelConfig.preset("deepseek-v3"))
    assert count.total == 671_026_404_352  # a direct count of the released config (see docs)
    assert round(count.total / 1e9, 1) == 671.0
    assert count.activated / 1e9 == pytest.approx(37, abs=1)  # "37B activated for each token"
    assert count.embedding == count.head == 129280 * 7168
    expected = closed_form(ModelConfig.preset("deepseek-v3"))
    assert (count.total, count.activated, count.mtp) == (expected["total"], expected["activated"], expected["mtp"])


@pytest.mark.parametrize("changes", [dict(), dict(q_lora_rank=None, tie_word_embeddings=True),
                                     dict(first_k_dense_replace=0, n_shared_experts=2, moe_layer_freq=2),
                                     dict(num_nextn_predict_layers=2)])
def test_count_matches_closed_form_and_a_real_model(changes):
    cfg = tiny_config(**changes)
    count = dsv3ref.count_parameters(cfg)
    expected = closed_form(cfg)
    assert (count.total, count.activated, count.mtp) == (expected["total"], expected["activated"], expected["mtp"])
    kinds = [expected["moe_layer"] if cfg.is_moe_layer(i) else expected["dense_layer"]
             for i in range(cfg.num_hidden_layers)]
    assert list(count.per_layer) == kinds
    real = dsv3ref.DeepseekV3(cfg)  # its MTP modules share the embedding and head
    assert count.total + count.mtp == sum(p.numel() for p in real.parameters())
