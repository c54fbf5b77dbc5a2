"""Bugs planted on purpose, for the oracle lesson (notebook 03) and its tests.

Each is a context manager that breaks one thing in a loaded model (or in dsv3ref itself) the way an
implementer might get it wrong, and restores exactly what it patched on exit, so the same model (and
the rest of the session) is correct again afterwards:

    with planted_bugs.non_interleaved_rope(model):
        broken = dsv3ref.trace(model, ids)
    print(dsv3ref.compare(reference, broken))   # names model.layers.0.self_attn as the first divergence

`tools/mutate.py` holds the wider list of bugs the test suite is checked against; these four are the
ones the lesson traces, because each shows up first at a different kind of point.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dsv3ref import mla


def half_split_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the pairs (x_i, x_{i + d/2}) (GPT-NeoX's layout) instead of DeepSeek's interleaved
    (x_{2i}, x_{2i+1}): the same rotation applied to the wrong coordinates."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


@contextmanager
def non_interleaved_rope(model=None) -> Iterator[None]:
    """Every attention layer rotates half-split pairs (dsv3ref.mla's apply_rope is swapped, for every
    model, while the block runs)."""
    original = mla.apply_rope
    mla.apply_rope = half_split_rope
    try:
        yield
    finally:
        mla.apply_rope = original


@contextmanager
def bias_in_combine_weights(model, layer: int) -> Iterator[None]:
    """Layer `layer`'s router adds its balancing bias to the gate values as well as to the choice (the
    report uses the bias for choosing only, eq. 16). Shows only where the bias is non-zero."""
    gate = model.model.layers[layer].mlp.gate
    plain = gate.forward

    def buggy(x):
        weights, ids = plain(x)
        return weights + gate.e_score_correction_bias[ids].to(weights.dtype), ids

    gate.forward = buggy
    try:
        yield
    finally:
        del gate.forward  # the instance attribute; the class's forward is used again


@contextmanager
def yarn_without_mscale(model) -> Iterator[None]:
    """Every attention layer uses 1/sqrt(qk_head_dim) as its softmax scale, forgetting YaRN's
    mscale(factor, mscale_all_dim)^2 (section 4.3; 1.8738 for the released config)."""
    layers = [layer.self_attn for layer in model.model.layers]
    saved = [a.softmax_scale for a in layers]
    for a in layers:
        a.softmax_scale = model.config.qk_head_dim ** -0.5
    try:
        yield
    finally:
        for a, scale in zip(layers, saved, strict=True):
            a.softmax_scale = scale


@contextmanager
def swapped_shared_expert(model, layer: int) -> Iterator[None]:
    """Layer `layer`'s shared expert with gate_proj and up_proj exchanged (SwiGLU's silu applied to
    the wrong half)."""
    mlp = model.model.layers[layer].mlp.shared_experts
    mlp.gate_proj, mlp.up_proj = mlp.up_proj, mlp.gate_proj
    try:
        yield
    finally:
        mlp.gate_proj, mlp.up_proj = mlp.up_proj, mlp.gate_proj
