"""dsv3ref against Hugging Face transformers' DeepseekV3ForCausalLM on the same weights.

The weights travel through checkpoints on disk in both directions, so these tests also check that
the two implementations read and write the same format. Tolerance: float32 logits agree to a
relative error (max |diff| / max |ref|) below 1e-5; the two differ only in the order of float32
operations (HF concatenates nope and rope parts into one matmul, computes rotary angles in float32).
"""

import pytest
import torch
from helpers import hf_load, hf_model, random_dsv3ref, rel_err, tiny_config

import dsv3ref
from dsv3ref import RopeScaling

CONFIGS = {
    "yarn-groups-norm": dict(),
    "no-q-lora": dict(q_lora_rank=None),
    "one-group-no-norm": dict(n_group=1, topk_group=1, norm_topk_prob=False),
    "all-moe-two-shared": dict(first_k_dense_replace=0, n_shared_experts=2, num_hidden_layers=2),
    "two-dense-plain-rope": dict(first_k_dense_replace=2, rope_scaling=None, num_hidden_layers=3),
    "many-groups-tied": dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4,
                             tie_word_embeddings=True, routed_scaling_factor=1.7),
    "yarn-equal-mscale": dict(rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=8,
                                                       mscale=1.0, mscale_all_dim=1.0)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf_loading_hf_checkpoint(name, tmp_path):
    cfg = tiny_config(**CONFIGS[name])
    hf = hf_model(cfg, tmp_path / "cfg", seed=1)
    hf.save_pretrained(tmp_path / "hf")
    ours = dsv3ref.DeepseekV3.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (3, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (3, 40, cfg.vocab_size)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("name", ["yarn-groups-norm", "no-q-lora", "many-groups-tied"])
def test_hf_loads_dsv3ref_checkpoint_and_agrees(name, tmp_path):
    cfg = tiny_config(**CONFIGS[name])
    ours = random_dsv3ref(cfg, seed=2)
    dsv3ref.save_pretrained(ours, tmp_path / "ours")
    hf = hf_load(tmp_path / "ours")
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-5
    # ... and HF writes back what it read: dsv3ref reloads HF's save bit for bit.
    hf.save_pretrained(tmp_path / "back")
    again = dsv3ref.DeepseekV3.from_pretrained(tmp_path / "back")
    for name_, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name_], t), name_


def test_router_bias_changes_choice_but_both_agree_with_hf(tmp_path):
    """A large router bias moves tokens to other experts; the logits change and still match HF."""
    cfg = tiny_config(first_k_dense_replace=0, num_hidden_layers=1)
    hf = hf_model(cfg, tmp_path / "cfg", seed=3)
    ids = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        before = hf(ids).logits
        hf.model.layers[0].mlp.gate.e_score_correction_bias.copy_(torch.linspace(-2, 2, cfg.n_routed_experts))
        after = hf(ids).logits
    assert rel_err(after, before) > 1e-2  # the bias really changes which experts run
    hf.save_pretrained(tmp_path / "hf")
    ours = dsv3ref.DeepseekV3.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert rel_err(ours(ids), after) < 1e-5
