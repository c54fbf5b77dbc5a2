"""Shared test helpers: random configs, and Hugging Face transformers as the independent oracle."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch

import dsv3ref
from dsv3ref import ModelConfig, RopeScaling
from dsv3ref.fp8 import scaled_mm_recipe
from dsv3ref.rope import RotaryEmbedding


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the scale of the reference b."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

# torch's CPU wheels (what CI installs) have scaled_mm's CPU kernel; some CUDA builds register the operator
# for CUDA only (torch 2.11+cu130 on the H200 machine): there the CPU tests of the kernel cannot run
needs_cpu_scaled_mm = pytest.mark.skipif(
    scaled_mm_recipe("cpu") is None and torch.cuda.is_available(),
    reason="this CUDA build of torch has no CPU kernel for scaled_mm")


def stacked_expert_grads(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop experts' weight gradients stacked as the grouped layout holds its weights: (gate_up_proj
    (e, 2 inter, dim), down_proj (e, dim, inter)); an expert without a gradient (no token chose it) as zeros."""
    def grad(p):
        return p.grad if p.grad is not None else torch.zeros_like(p)
    return (torch.stack([torch.cat([grad(e.gate_proj.weight), grad(e.up_proj.weight)]) for e in experts]),
            torch.stack([grad(e.down_proj.weight) for e in experts]))


def tiny_config(**changes) -> ModelConfig:
    """A small config with every feature switched on; `changes` override fields."""
    base = dict(
        vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
        intermediate_size=72, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16, mscale=0.8, mscale_all_dim=1.2),
        max_position_embeddings=128, num_nextn_predict_layers=0, quantization_config=None,
    )
    if "num_attention_heads" in changes and "num_key_value_heads" not in changes:
        changes["num_key_value_heads"] = changes["num_attention_heads"]
    base.update(changes)
    return ModelConfig(**base)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, bias_scale: float = 0.3) -> torch.nn.Module:
    """Give every weight a random value of a size that keeps activations O(1), so that attention is
    far from uniform and routing depends on the input; norms get weights near one and the router
    bias a random value (the auxiliary-loss-free bias of a trained model is non-zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p.shape[-1]
            std = 1.0 if "embed" in name else 1.5 / math.sqrt(fan_in)
            p.copy_(std * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(bias_scale * torch.randn(b.shape, generator=g))
    return model


def random_dsv3ref(cfg: ModelConfig, seed: int = 0, **kw) -> dsv3ref.DeepseekV3:
    return randomize_(dsv3ref.DeepseekV3(cfg, **kw), seed).eval()


def hf_model(cfg: ModelConfig, folder: Path, seed: int = 0):
    """Hugging Face DeepseekV3ForCausalLM for `cfg` (config written by dsv3ref), random weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    cfg.save(folder)
    hf_cfg = DeepseekV3Config.from_pretrained(folder)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM._from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32)
    return randomize_(model, seed).eval()


def hf_load(folder: Path):
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


def mtp_config(**changes):
    return tiny_config(num_nextn_predict_layers=changes.pop("depth", 1), **changes)


def direct_mtp(model, depth, h_prev, next_ids):
    """Eqs. 21-23 written out: [enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1})] -> eh_proj -> one decoder layer
    (pre-norm attention + pre-norm FFN, causal, RoPE positions 0..) -> shared_head.norm -> head."""
    layer = model.model.layers[model.config.num_hidden_layers + depth - 1]
    emb = model.model.embed_tokens.weight[next_ids]  # (b, t, d)

    def rms(x, w):
        return w * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + model.config.rms_norm_eps)

    x = torch.cat([rms(emb, layer.enorm.weight), rms(h_prev, layer.hnorm.weight)], dim=-1) @ layer.eh_proj.weight.T
    b, t = next_ids.shape
    pos = torch.arange(t).expand(b, t)
    cos, sin = RotaryEmbedding(model.config)(pos, x.dtype)
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t)
    h = x + layer.self_attn(rms(x, layer.input_layernorm.weight), cos, sin, mask)
    h = h + layer.mlp(rms(h, layer.post_attention_layernorm.weight))
    return h, rms(h, layer.shared_head.norm.weight) @ model.lm_head.weight.T


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous and local servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
