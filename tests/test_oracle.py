"""The oracle interface: traces line up with HF's, and compare points at injected bugs.

Tolerance: rtol 1e-5 of each tensor's scale for float32 against float32 (round-off), as compare's
default; the injected bugs below change their first point by far more than that.
"""

import subprocess
import sys
from functools import partial

import pytest
import torch
from helpers import hf_model, random_dsv3ref, tiny_config

from dsv3ref import DeepseekV3, compare, planted_bugs, trace, trace_hf

EXPECTED_POINTS_PER_MOE_LAYER = ["input_layernorm:input", "self_attn", "post_attention_layernorm:input",
                                 "mlp.gate:weights", "mlp.gate:ids", "mlp.experts", "mlp.shared_experts", "mlp", ""]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oracle")
    cfg = tiny_config(num_hidden_layers=4, first_k_dense_replace=1)
    hf = hf_model(cfg, folder / "cfg", seed=21)
    hf.save_pretrained(folder / "hf")
    return cfg, hf, folder / "hf"


def test_dsv3ref_trace_matches_hf_hooks_at_every_point(checkpoint):
    cfg, hf, path = checkpoint
    ours = DeepseekV3.from_pretrained(path)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    a, b = trace(ours, ids), trace_hf(hf, ids)
    assert list(a) == list(b)  # same points, same order
    layer1 = [k.removeprefix("model.layers.1").lstrip(".") for k in a if k.startswith("model.layers.1.")
              or k == "model.layers.1"]
    assert layer1 == EXPECTED_POINTS_PER_MOE_LAYER
    result = compare(a, b)
    assert result.ok, str(result)
    assert len(result.rows) == 1 + 5 + 3 * 9 + 2 and not result.missing  # embed, dense layer, 3 MoE, norm+head
    assert torch.equal(a["lm_head"], ours(ids))


def test_fast_path_trace_matches_readable_path(checkpoint):
    cfg, _, path = checkpoint
    ids = torch.randint(0, cfg.vocab_size, (1, 23))
    slow = trace(DeepseekV3.from_pretrained(path), ids)
    fast = trace(DeepseekV3.from_pretrained(path, attn_impl="absorb", moe_impl="grouped"), ids)
    assert compare(slow, fast).ok


def test_float64_run_agrees_with_float32_within_float32_roundoff(checkpoint):
    cfg, _, path = checkpoint
    ids = torch.randint(0, cfg.vocab_size, (2, 15))
    t64 = trace(DeepseekV3.from_pretrained(path, dtype=torch.float64), ids)
    t32 = trace(DeepseekV3.from_pretrained(path, dtype=torch.float32), ids)
    assert all(v.dtype in (torch.float64, torch.int64) for v in t64.values())
    assert compare(t64, t32, rtol=1e-5).ok
    assert not compare(t64, t32, rtol=1e-9).ok  # float32 really is less exact: the check can fail


def first_divergence_with(path, cfg, inject):
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    model = DeepseekV3.from_pretrained(path)
    reference = trace(model, ids)
    with inject(model):
        other = trace(model, ids)
    after = trace(model, ids)  # the bug is gone again: the same model traces as before
    assert compare(reference, after, rtol=0.0).ok, inject
    return compare(reference, other)


def test_compare_names_the_first_diverging_module_for_planted_bugs(checkpoint):
    cfg, _, path = checkpoint
    cases = {planted_bugs.non_interleaved_rope: "model.layers.0.self_attn",
             partial(planted_bugs.bias_in_combine_weights, layer=2): "model.layers.2.mlp.gate:weights",
             planted_bugs.yarn_without_mscale: "model.layers.0.self_attn",
             partial(planted_bugs.swapped_shared_expert, layer=3): "model.layers.3.mlp.shared_experts"}
    for inject, expected in cases.items():
        result = first_divergence_with(path, cfg, inject)
        assert result.first_divergence == expected, (inject, str(result))
        assert ">>" + expected in str(result)


def test_routing_flips_are_counted_apart(checkpoint):
    cfg, _, path = checkpoint
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    good = DeepseekV3.from_pretrained(path)
    bad = DeepseekV3.from_pretrained(path)
    reference = trace(good, ids)
    chosen = reference["model.layers.1.mlp.gate:ids"]
    rare = int(torch.bincount(chosen.flatten(), minlength=cfg.n_routed_experts).argmin())
    with torch.no_grad():
        bad.model.layers[1].mlp.gate.e_score_correction_bias[rare] += 10.0  # the rarest expert now wins everywhere
    result = compare(reference, trace(bad, ids))
    assert result.routing_flips["model.layers.1.mlp.gate"] == int((chosen != rare).all(-1).sum())
    assert result.routing_flips["model.layers.1.mlp.gate"] > 0
    assert result.routing_flips["model.layers.1.mlp.gate"] <= 34
    assert not result.ok and "routing flips" in str(result)


def test_compare_reports_missing_points_and_shape_mismatch():
    ref = {"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.zeros(1)}
    other = {"a": torch.ones(2, 3), "b": torch.ones(5)}
    result = compare(ref, other)
    assert result.missing == ["c"] and result.first_divergence == "b"
    assert "shape (5,) != (4,)" in str(result)


def test_compare_cli_against_hf_and_fast_path(checkpoint):
    _, _, path = checkpoint
    for against in ("hf", "fast"):
        run = subprocess.run([sys.executable, "-m", "dsv3ref", "compare", str(path), "--against", against,
                              "--seq-len", "9"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "first divergence: none; routing flips: 0 token(s)" in run.stdout
        assert "model.layers.3.mlp.experts" in run.stdout


def test_tracing_leaves_no_hooks_behind():
    model = random_dsv3ref(tiny_config())
    trace(model, torch.zeros(1, 3, dtype=torch.long))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_trace_includes_the_mtp_hidden_state():
    cfg = tiny_config(num_nextn_predict_layers=2)
    model = random_dsv3ref(cfg, seed=22)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    t = trace(model, ids)
    with torch.no_grad():
        h1 = model.mtp_hidden_states(1, model.hidden_states(ids)[:, :8], ids[:, 1:])
        h2 = model.mtp_hidden_states(2, h1[:, :7], ids[:, 2:])
    assert torch.equal(t["model.layers.3"], h1) and torch.equal(t["model.layers.4"], h2)
    assert "model.layers.3.mlp.gate:ids" in t and "model.layers.4.self_attn" in t
    assert not any("#" in key for key in t)  # every point traced once
