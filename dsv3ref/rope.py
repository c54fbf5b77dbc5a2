"""Rotary position embedding in DeepSeek's interleaved layout, with YaRN context extension.

DeepSeek rotates consecutive pairs of channels, (x0, x1), (x2, x3), ..., pair i by the angle
position * theta_i. Read as complex numbers z_i = x_{2i} + j x_{2i+1}, the rotation is
z_i * exp(j * position * theta_i) (RoFormer, eq. 34).

YaRN (Peng et al. 2023; DeepSeek-V3 report section 4.3) stretches the context by `factor`:
- frequencies that turn fewer than `beta_slow` times over the original context are divided by
  `factor` (interpolated), those that turn more than `beta_fast` times are kept (extrapolated), and a
  linear ramp blends the ones in between;
- cos and sin are multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim);
- the softmax scale 1/sqrt(d_qk) is multiplied by mscale(factor, mscale_all_dim)^2,
where mscale(s, m) = 0.1 * m * ln(s) + 1 for s > 1, else 1.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from dsv3ref.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Angular frequency theta_i of each rotary pair, float64, shape (qk_rope_head_dim // 2,)."""
    dim = cfg.qk_rope_head_dim
    base_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return base_freq

    def pair_index_for(rotations: float) -> float:
        # The pair index whose frequency turns `rotations` times over the original context.
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(cfg.rope_theta))

    low = max(math.floor(pair_index_for(rs.beta_fast)), 0)
    high = min(math.ceil(pair_index_for(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    # ramp = 0: high frequency, kept as is; ramp = 1: low frequency, interpolated.
    return base_freq / rs.factor * ramp + base_freq * (1 - ramp)


def rope_amplitude(cfg: ModelConfig) -> float:
    """The factor YaRN applies to cos and sin (1.0 without YaRN)."""
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)


def softmax_scale(cfg: ModelConfig) -> float:
    """The attention logit scale: 1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
    return scale


class RotaryEmbedding:
    """cos/sin tables for given positions.

    The frequencies are held in float64 on the CPU (not as a module buffer, so that casting a model
    to bf16 never rounds them); angles are formed in float64 and rounded once to the output dtype.
    """

    def __init__(self, cfg: ModelConfig):
        self.inv_freq = rope_inv_freq(cfg)  # (pairs,)
        self.amplitude = rope_amplitude(cfg)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., t) integer -> cos, sin of shape (..., t, pairs) in `dtype`."""
        freq = self.inv_freq.to(positions.device)
        angles = positions.to(torch.float64)[..., None] * freq  # (..., t, pairs)
        return (angles.cos() * self.amplitude).to(dtype), (angles.sin() * self.amplitude).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of the last axis of x.

    x: (..., 2 * pairs); cos, sin: broadcastable to (..., pairs). Returns x's shape and layout.
    """
    pairs = rearrange(x, "... (p two) -> ... p two", two=2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rearrange(rotated, "... p two -> ... (p two)")
