"""Interleaved RoPE as a complex rotation, and YaRN's frequencies and scales against HF and the
report's ramp."""

import math

import pytest
import torch
from helpers import rel_err, tiny_config

from dsv3ref import RopeScaling
from dsv3ref.rope import RotaryEmbedding, apply_rope, rope_inv_freq, softmax_scale, yarn_mscale


def test_rope_is_complex_rotation_of_interleaved_pairs():
    """RoFormer: pair i of a vector at position m is multiplied by exp(j * m * theta_i)."""
    cfg = tiny_config(rope_scaling=None)
    rope = RotaryEmbedding(cfg)
    positions = torch.tensor([[0, 1, 5, 100]])
    x = torch.randn(1, 4, 3, cfg.qk_rope_head_dim, dtype=torch.float64)
    cos, sin = rope(positions, torch.float64)
    got = apply_rope(x, cos[:, :, None], sin[:, :, None])
    theta = 10000.0 ** (-torch.arange(0, cfg.qk_rope_head_dim, 2, dtype=torch.float64) / cfg.qk_rope_head_dim)
    z = torch.view_as_complex(x.reshape(1, 4, 3, -1, 2).contiguous())
    rot = torch.exp(1j * positions[..., None, None].double() * theta)
    expected = torch.view_as_real(z * rot).reshape(x.shape)
    assert rel_err(got, expected) < 1e-14


def test_rope_scores_depend_only_on_relative_position():
    cfg = tiny_config()
    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(cfg.qk_rope_head_dim, dtype=torch.float64), torch.randn(cfg.qk_rope_head_dim,
                                                                                 dtype=torch.float64)

    def score(m, n):
        cq, sq = rope(torch.tensor([m]), torch.float64)
        ck, sk = rope(torch.tensor([n]), torch.float64)
        return (apply_rope(q, cq[0], sq[0]) * apply_rope(k, ck[0], sk[0])).sum()

    assert score(7, 3).item() == pytest.approx(score(54, 50).item(), rel=1e-12)


def test_yarn_frequencies_match_hf_and_the_ramp_limits():
    from types import SimpleNamespace

    from transformers.modeling_rope_utils import _compute_yarn_parameters

    cfg = tiny_config(qk_rope_head_dim=64, rope_theta=10000.0,
                      rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096,
                                               mscale=1.0, mscale_all_dim=1.0))
    ours = rope_inv_freq(cfg)
    params = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                  beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    hf_cfg = SimpleNamespace(rope_parameters=params, head_dim=64, hidden_size=0, num_attention_heads=1,
                             max_position_embeddings=163840, standardize_rope_params=lambda: None)
    hf_freq, hf_factor = _compute_yarn_parameters(hf_cfg)
    assert rel_err(ours, hf_freq) < 1e-6  # HF works in float32
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    # Pairs turning more than beta_fast=32 times over 4096 positions are kept; fewer than once: divided by 40.
    turns = 4096 * base / (2 * math.pi)
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any() and not (fast | slow).all()  # both ends and a ramp between them
    assert torch.allclose(ours[fast], base[fast], rtol=1e-14, atol=0)
    assert torch.allclose(ours[slow], base[slow] / 40, rtol=1e-14, atol=0)
    # HF's cos/sin amplitude ("attention factor") for mscale == mscale_all_dim, against dsv3ref's own
    cos, sin = RotaryEmbedding(cfg)(torch.arange(5)[None], torch.float64)
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, hf_factor**2), rtol=1e-6)


def test_yarn_softmax_scale_and_amplitude():
    cfg = tiny_config(rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=16,
                                               mscale=0.5, mscale_all_dim=1.0))
    m_all = 0.1 * math.log(40) + 1
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim**-0.5 * m_all**2, rel=1e-15)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(3)[None], torch.float64)
    amplitude = (0.05 * math.log(40) + 1) / m_all
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, amplitude**2), rtol=1e-14)
    assert yarn_mscale(1.0, 5.0) == 1.0
