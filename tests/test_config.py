"""ModelConfig: the published config, presets, validation and (de)serialization."""

import json
from pathlib import Path

import pytest

from dsv3ref import ModelConfig, RopeScaling

PUBLISHED = Path(__file__).parent / "data" / "deepseek-v3-config.json"  # the config.json of the release


def test_deepseek_v3_preset_equals_published_config_json():
    published = json.loads(PUBLISHED.read_text())
    preset = ModelConfig.preset("deepseek-v3").to_dict()
    assert preset == published


def test_published_config_loads_with_every_value():
    cfg = ModelConfig.from_pretrained(PUBLISHED)
    assert cfg == ModelConfig.preset("deepseek-v3")
    assert cfg.rope_scaling == RopeScaling(factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                           beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    assert cfg.qk_head_dim == 192
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert cfg.extra["aux_loss_alpha"] == 0.001  # kept, though it changes no computation


def test_from_pretrained_accepts_folder_and_file(tmp_path):
    cfg = ModelConfig.preset("tiny")
    cfg.save(tmp_path)
    assert ModelConfig.from_pretrained(tmp_path) == cfg
    assert ModelConfig.from_pretrained(tmp_path / "config.json") == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    d = ModelConfig.preset("tiny").to_dict() | {"some_future_key": [1, 2], "ep_size": 8}
    cfg = ModelConfig.from_dict(d)
    assert cfg.extra["some_future_key"] == [1, 2]
    assert cfg.to_dict() == d


def test_hf5_rope_parameters_form_is_read():
    d = ModelConfig.preset("tiny").to_dict()
    rope = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {**rope, "rope_type": "yarn", "rope_theta": 5000.0}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling.factor == rope["factor"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert ModelConfig.from_dict(d).rope_scaling is None


@pytest.mark.parametrize("change,field", [
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(n_routed_experts=9), "n_routed_experts"),
    (dict(topk_group=5), "topk_group"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="magic"), "topk_method"),
    (dict(hidden_size=-4), "hidden_size"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(num_experts_per_tok=5, topk_group=1), "num_experts_per_tok"),
    (dict(n_group=8, topk_group=2), "n_group"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.type"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling.original_max_position_embeddings"),
    (dict(rope_scaling={"type": "yarn", "factor": -2.0, "original_max_position_embeddings": 4}),
     "rope_scaling.factor"),
])
def test_invalid_values_raise_naming_the_field(change, field):
    d = ModelConfig.preset("tiny").to_dict() | change
    with pytest.raises(ValueError, match=f"config field {field}[: ]"):
        ModelConfig.from_dict(d)


def test_unsupported_rope_layout_is_refused():
    d = ModelConfig.preset("tiny").to_dict() | {"rope_interleave": False}
    with pytest.raises(ValueError, match="rope_interleave"):
        ModelConfig.from_dict(d)


def test_bad_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 0}))
    with pytest.raises(ValueError, match=r"config.json: config field hidden_size"):
        ModelConfig.from_pretrained(tmp_path)


def test_presets_are_valid_and_unknown_preset_is_an_error():
    for name in ("tiny", "small", "deepseek-v3"):
        ModelConfig.preset(name).validate()
    with pytest.raises(ValueError, match="unknown name 'huge'"):
        ModelConfig.preset("huge")
