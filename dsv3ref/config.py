"""The model configuration: every field of DeepSeek-V3's config.json that changes what is computed.

`ModelConfig` mirrors the published `config.json` field for field (same names, same meaning), checks
that the values fit together, and keeps any keys it does not use so that a config read from a
checkpoint is written back unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3ref.atomic import atomic_write_text
from dsv3ref.fp8 import QUANTIZATION_CONFIG

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


@dataclass
class RopeScaling:
    """YaRN context extension of the rotary embedding (DeepSeek-V3 report, section 4.3).

    Published DeepSeek-V3 values: factor 40, original context 4096, beta_fast 32, beta_slow 1,
    mscale = mscale_all_dim = 1.0.
    """

    factor: float
    """How much longer the target context is than the pre-training one (s in the YaRN paper)."""
    original_max_position_embeddings: int
    """The context length the model was pre-trained with."""
    beta_fast: float = 32.0
    """Rotations over the original context above which a frequency is left unchanged (extrapolated)."""
    beta_slow: float = 1.0
    """Rotations over the original context below which a frequency is fully divided by `factor`."""
    mscale: float = 1.0
    """Coefficient of the YaRN temperature applied to cos/sin: 0.1 * mscale * ln(factor) + 1."""
    mscale_all_dim: float = 0.0
    """Coefficient of the same temperature applied to the whole softmax scale (squared)."""
    type: str = "yarn"
    """Only "yarn" is used by DeepSeek-V3."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeScaling | None:
        if not isinstance(d, dict):
            raise ValueError(f"config field rope_scaling: found {d!r}, expected an object (YaRN parameters) or null")
        kind = d.get("type", d.get("rope_type", "yarn"))
        if kind == "default":
            return None
        if kind != "yarn":
            raise ValueError(f"config field rope_scaling.type: found {kind!r}, expected 'yarn' (or no rope_scaling)")
        for key in ("factor", "original_max_position_embeddings"):
            if d.get(key) is None:
                raise ValueError(f"config field rope_scaling.{key} is required for YaRN and was not given")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        values["type"] = "yarn"
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V3 model, named exactly as in the published config.json."""

    vocab_size: int = 129280
    """Number of token ids (embedding rows and logits)."""
    hidden_size: int = 7168
    """Width d of the residual stream."""
    num_hidden_layers: int = 61
    """Decoder blocks of the main model (the MTP layers come after these)."""
    num_attention_heads: int = 128
    """Attention heads n_h."""
    num_key_value_heads: int = 128
    """MLA has no grouped heads: must equal num_attention_heads."""
    q_lora_rank: int | None = 1536
    """Rank d_c' of the compressed query (eq. 6); None means a full-rank q_proj (DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 512
    """Rank d_c of the compressed key-value latent c^KV (eq. 1): what the KV cache stores."""
    qk_nope_head_dim: int = 128
    """Per-head size of the position-free part of queries and keys (d_h)."""
    qk_rope_head_dim: int = 64
    """Per-head size of the rotary part of queries and of the single shared rotary key (d_h^R)."""
    v_head_dim: int = 128
    """Per-head size of the values."""
    intermediate_size: int = 18432
    """Hidden size of the dense SwiGLU MLP of the first `first_k_dense_replace` layers."""
    moe_intermediate_size: int = 2048
    """Hidden size of each routed expert (and of each shared expert)."""
    n_routed_experts: int = 256
    """Routed experts N_r per MoE layer."""
    n_shared_experts: int = 1
    """Shared experts N_s per MoE layer, fused into one MLP of n_shared * moe_intermediate_size."""
    num_experts_per_tok: int = 8
    """Routed experts K_r chosen for each token."""
    n_group: int = 8
    """Groups the routed experts are split into for group-limited routing (nodes, in the report)."""
    topk_group: int = 4
    """Groups M a token may pick its experts from."""
    first_k_dense_replace: int = 3
    """The first k layers use a dense MLP instead of MoE."""
    moe_layer_freq: int = 1
    """After the dense layers, every moe_layer_freq-th layer is an MoE layer."""
    routed_scaling_factor: float = 2.5
    """Multiplier of the routed experts' combined output."""
    norm_topk_prob: bool = True
    """Normalize the chosen experts' gate values to sum to one (eq. 13)."""
    scoring_func: str = "sigmoid"
    """Router affinity: "sigmoid" (V3, eq. 15) or "softmax" (V2)."""
    topk_method: str = "noaux_tc"
    """"noaux_tc" (V3: biased scores, groups ranked by their two best experts), "group_limited_greedy"
    (V2: groups ranked by their best expert) or "greedy" (plain top-k)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: RopeScaling | None = field(
        default_factory=lambda: RopeScaling(
            factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
            mscale=1.0, mscale_all_dim=1.0,
        )
    )
    """YaRN parameters, or None for plain RoPE."""
    max_position_embeddings: int = 163840
    """Longest sequence the model accepts (positions 0 .. max_position_embeddings - 1)."""
    num_nextn_predict_layers: int = 1
    """Multi-Token Prediction depth D (the MTP modules stored after the main layers)."""
    tie_word_embeddings: bool = False
    """Share the LM head with the token embedding."""
    attention_bias: bool = False
    """Biases on q_a_proj, kv_a_proj_with_mqa and o_proj (False for every released DeepSeek model)."""
    hidden_act: str = "silu"
    """Activation of the SwiGLU MLPs: only "silu" exists in DeepSeek models."""
    initializer_range: float = 0.02
    """Standard deviation of the random normal initialization."""
    quantization_config: dict[str, Any] | None = field(default_factory=lambda: copy.deepcopy(QUANTIZATION_CONFIG))
    """FP8 storage of the checkpoint (None for a bf16/fp32 checkpoint)."""
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Keys of config.json that do not change the computation; kept so a round trip preserves them."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)
        # What Hugging Face needs to recognize a written config.json.
        self.extra.setdefault("model_type", "deepseek_v3")
        self.extra.setdefault("architectures", ["DeepseekV3ForCausalLM"])
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        """Per-head size of queries and keys: nope part + rope part (192 in DeepSeek-V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` uses MoE (True) or the dense MLP (False)."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is invalid or inconsistent."""

        def fail(name: str, found: Any, expected: str) -> None:
            raise ValueError(f"config field {name}: found {found!r}, expected {expected}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v: Any) -> bool:  # JSON numbers: int or float, finite (json reads Infinity and NaN)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("norm_topk_prob", "tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "true or false")
        for name in ("routed_scaling_factor", "rms_norm_eps", "rope_theta", "initializer_range"):
            if not is_number(getattr(self, name)):
                fail(name, getattr(self, name), "a finite number")
        for name in ("scoring_func", "topk_method", "hidden_act"):
            if not isinstance(getattr(self, name), str):
                fail(name, getattr(self, name), "a string")
        if self.bos_token_id is not None and not (is_int(self.bos_token_id) and self.bos_token_id >= 0):
            fail("bos_token_id", self.bos_token_id, "a token id (integer >= 0) or null")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if self.eos_token_id is not None and not all(is_int(t) and t >= 0 for t in eos):
            fail("eos_token_id", self.eos_token_id, "a token id (integer >= 0), a list of them, or null")
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            fail("quantization_config", self.quantization_config, "an object or null")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            fail("rope_scaling", self.rope_scaling, "an object (YaRN parameters) or null")

        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
            "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq",
            "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, value, "a positive integer")
        for name in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, value, "a non-negative integer")
        if self.q_lora_rank is not None and (not is_int(self.q_lora_rank) or self.q_lora_rank <= 0):
            fail("q_lora_rank", self.q_lora_rank, "a positive integer or null")
        if self.num_key_value_heads != self.num_attention_heads:
            fail("num_key_value_heads", self.num_key_value_heads,
                 f"{self.num_attention_heads} (= num_attention_heads; MLA has as many key/value heads as query heads)")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", self.qk_rope_head_dim, "an even number (rotary pairs)")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", self.scoring_func, f"one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", self.topk_method, f"one of {TOPK_METHODS}")
        if self.hidden_act != "silu":
            fail("hidden_act", self.hidden_act, "'silu'")
        if not self.rms_norm_eps > 0:
            fail("rms_norm_eps", self.rms_norm_eps, "a positive number")
        if not self.rope_theta > 0:
            fail("rope_theta", self.rope_theta, "a positive number")
        if self.n_routed_experts > 0:
            if self.n_routed_experts % self.n_group:
                fail("n_routed_experts", self.n_routed_experts, f"a multiple of n_group={self.n_group}")
            if self.topk_group > self.n_group:
                fail("topk_group", self.topk_group, f"at most n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                fail("num_experts_per_tok", self.num_experts_per_tok,
                     f"at most topk_group * experts per group = {self.topk_group * per_group}")
            if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
                fail("n_group", self.n_group,
                     "at most n_routed_experts / 2 (noaux_tc ranks a group by its two best experts)")
        rs = self.rope_scaling
        if rs is not None:
            for name in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                if not is_number(getattr(rs, name)):
                    fail(f"rope_scaling.{name}", getattr(rs, name), "a finite number")
            if not rs.factor > 0:
                fail("rope_scaling.factor", rs.factor, "a positive number")
            if not (is_int(rs.original_max_position_embeddings) and rs.original_max_position_embeddings > 0):
                fail("rope_scaling.original_max_position_embeddings", rs.original_max_position_embeddings,
                     "a positive integer")
            if not rs.beta_fast > rs.beta_slow > 0:
                fail("rope_scaling.beta_fast", rs.beta_fast, f"greater than beta_slow={rs.beta_slow} > 0")
        if self.extra.get("rope_interleave") is False:
            fail("rope_interleave", False, "true (DeepSeek checkpoints store rotary dimensions as interleaved pairs)")

    # ------------------------------------------------------------------ (de)serialization
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build a config from a config.json dictionary; keys that change nothing land in `extra`."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a JSON object, found {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = dict(d.pop("extra", {}) or {})
        # Hugging Face transformers >= 5 writes rope_scaling and rope_theta together as rope_parameters.
        if "rope_parameters" in d and "rope_scaling" not in d:
            rope = dict(d.pop("rope_parameters") or {})
            if "rope_theta" in rope:
                d.setdefault("rope_theta", rope.pop("rope_theta"))
            d["rope_scaling"] = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        for key, value in d.items():
            (values if key in known else extra)[key] = value
        if values.get("num_key_value_heads") is None and "num_attention_heads" in values:
            values["num_key_value_heads"] = values["num_attention_heads"]
        if "rope_scaling" not in values:
            values["rope_scaling"] = None  # a config.json without the key has plain RoPE
        if "quantization_config" not in values:
            values["quantization_config"] = None
        for key in ("rope_theta", "routed_scaling_factor", "rms_norm_eps", "initializer_range"):
            if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
                values[key] = float(values[key])
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config.json dictionary: published field names, extra keys included."""
        d: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            d[f.name] = value.to_dict() if isinstance(value, RopeScaling) else value
        return d

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a checkpoint folder, or from the path of a JSON file."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such config file (expected a checkpoint folder holding config.json)")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write config.json into folder `path` (atomically: a temporary name, then a rename)."""
        atomic_write_text(Path(path) / "config.json", json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A named configuration.

        - "deepseek-v3": the released 671B model, identical to its published config.json.
        - "tiny": every feature of the architecture at toy size; a forward pass takes milliseconds.
        - "small": a few hundred million parameters' worth of shape, for benchmarks on a CPU.
        """
        if name == "deepseek-v3":
            return cls(extra=dict(_DEEPSEEK_V3_EXTRA))
        if name == "tiny":
            return cls(
                vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=128, mscale=1.0,
                                         mscale_all_dim=1.0),
                max_position_embeddings=512, num_nextn_predict_layers=1, quantization_config=None,
            )
        if name == "small":
            return cls(
                vocab_size=32000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=32,
                num_key_value_heads=32, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
                qk_rope_head_dim=32, v_head_dim=64, intermediate_size=2816, moe_intermediate_size=512,
                n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                first_k_dense_replace=1,
                rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=4096, mscale=1.0,
                                         mscale_all_dim=1.0),
                max_position_embeddings=16384, num_nextn_predict_layers=0, quantization_config=None,
            )
        raise ValueError(f"ModelConfig.preset: unknown name {name!r}, expected one of 'deepseek-v3', 'tiny', 'small'")


# Keys of the published config.json that do not change the computation (kept for a faithful copy).
_DEEPSEEK_V3_EXTRA: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "ep_size": 1,
    "model_type": "deepseek_v3",
    "pretraining_tp": 1,
    "seq_aux": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
}
