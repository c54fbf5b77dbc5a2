"""The launch at full size, run on fake tensors (dsv3ref.parallel.simulation), held against counts written
out here and against the planner (dsv3ref.plan): what one rank of 8 (one H200 node) and of 16 (two
nodes, data-parallel attention) holds when it loads the release and generates 32 prompts of 4096
tokens, as `torchrun --nproc-per-node 8 -m dsv3ref generate` runs it by default.

The full-size cases take about 50 s and 35 s on 2 cores (one each); the grid of smaller cases runs
the same code on a model of a few layers.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv3ref.config import ModelConfig
from dsv3ref.parallel import Parallel
from dsv3ref.parallel.planner import GIB, RESERVE_BYTES, exchange_bytes, plan, weight_bytes
from dsv3ref.parallel.simulation import SimulationError, SimulationMode, balanced_choice, simulate

H200 = 143_771 * 2**20  # what torch.cuda.mem_get_info reports as an H200's total
RELEASE = ModelConfig.preset("deepseek-v3")


def ratio(planned, simulated) -> float:
    return (planned.weights + planned.derived + planned.cache + planned.activations) / simulated.peak


@pytest.fixture(scope="module")
def one_node():
    return simulate(RELEASE, 8, 0, Parallel("tp"))


@pytest.fixture(scope="module")
def two_nodes_dp():
    return simulate(RELEASE, 16, 5, Parallel("dp", "alltoall"))


def test_one_h200_node_holds_the_default_launch(one_node):
    s = one_node
    # chosen as a launch on an H200 chooses by default: the checkpoint's FP8 weights multiplied by torch's
    # blockwise scaled_mm, bf16 activations, absorbed attention; FP8 experts in a loop (grouped_mm is bf16 only)
    assert (s.impl.gemm_impl, s.impl.fp8_kernel, s.impl.attn_impl, s.impl.moe_impl) == ("fp8", "scaled_mm",
                                                                                        "absorb", "loop")
    # counted by hand: 61 layers of 512 latent + 64 rotary numbers per token in bf16, 32 rows x 4096
    # positions, and each layer's fill counter (int64 per row)
    assert s.cache == 32 * 4096 * 61 * (512 + 64) * 2 + 61 * 32 * 8 == 32 * 4096 * 70_272 + 15_616
    assert 85.1e9 < s.weights < 85.2e9  # the planner's 85.14 GB (tests/test_parallel.py holds its count)
    assert s.peak + RESERVE_BYTES < H200, s.peak / GIB  # 89.7 GiB measured, 3 GiB kept for CUDA and NCCL
    # a prefill pass of 2048 tokens: 32 rows x 64 positions
    p = plan(RELEASE, 8, "tp", "fp8", H200 / GIB, 32, 4096, 2048)
    assert p.weights == s.weights and p.cache == s.cache
    assert p.fits and abs(ratio(p, s) - 1) < 0.10, ratio(p, s)
    assert s.collectives["prefill"] == exchange_bytes(RELEASE, 8, "tp", "allreduce", 32 * 64, 32)
    assert s.collectives["decode"] == exchange_bytes(RELEASE, 8, "tp", "allreduce", 32, 32)
    # written out: all-reduces of (tokens, 7168) bf16 states after the embedding, 61 attention outputs,
    # 3 dense FFNs and 58 MoE layers (routed and shared experts together); the head's 129,280 / 8 logits
    assert s.collectives["decode"] == {"all_reduce": (1 + 61 + 3 + 58) * 32 * 7168 * 2,
                                       "all_gather_into_tensor": 32 * 16_160 * 2}


def test_two_nodes_with_data_parallel_attention(two_nodes_dp):
    s = two_nodes_dp
    assert s.rows == 2 and s.cache == 2 * 4096 * 70_272 + 61 * 2 * 8  # its 2 of the 32 prompts
    # its 16 experts of each of 58 MoE layers, the whole attention: 60.0 GB
    assert 59.9e9 < s.weights < 60.0e9
    p = plan(RELEASE, 16, "dp", "fp8", H200 / GIB, 32, 4096, 2048, moe_comm="alltoall")
    assert p.weights == s.weights and p.cache == s.cache
    assert abs(ratio(p, s) - 1) < 0.10, ratio(p, s)
    # each token goes once to every rank owning one of its experts: counted from the balanced routing
    choose = balanced_choice(RELEASE)
    per_rank = RELEASE.n_routed_experts // 16

    def pairs(tokens):
        owners = choose(0, torch.empty(tokens, RELEASE.n_routed_experts)) // per_rank
        sent = sum(len(set(row.tolist())) for row in owners)
        return [(sent, sent)] * 58  # a symmetric world receives what it sends

    width = 2048 // 2
    assert s.collectives["prefill"] == exchange_bytes(RELEASE, 16, "dp", "alltoall", 2 * width, 2, pairs=pairs(
        2 * width))
    assert s.collectives["decode"] == exchange_bytes(RELEASE, 16, "dp", "alltoall", 2, 2, pairs=pairs(2))
    # written out for one decode step: per MoE layer, 16 counts (int64), each of the 2 tokens' vectors to
    # the 4 ranks holding its experts (2 of a group's 32, on one rank, from each of 4 groups) with its 8
    # slots' ids (int32) and gates (bf16), and as many sums back
    assert pairs(2)[0][0] == 8
    assert s.collectives["decode"] == {"all_to_all_single": 58 * (16 * 8 + 8 * (7168 * 2 + 8 * 4 + 8 * 2)
                                                                  + 8 * 7168 * 2)}


SMALL = ModelConfig.preset("small").replace(num_hidden_layers=3, quantization_config=RELEASE.quantization_config)
"""The small preset (32 heads, 32 experts in 4 groups, hidden 1024) with the release's FP8 layout."""


@pytest.mark.parametrize("world, layout, comm, dtype, gemm, chunk", [
    (4, "tp", "allreduce", torch.bfloat16, "fp8", 2048),
    (4, "tp", "alltoall", torch.bfloat16, "fp8", 256),
    (2, "dp", "allreduce", torch.float32, "bf16", 2048),
    (4, "dp", "alltoall", torch.bfloat16, "bf16", 512),
])
def test_the_planner_follows_the_code_on_smaller_models(world, layout, comm, dtype, gemm, chunk):
    s = simulate(SMALL, world, 0, Parallel(layout, comm), dtype=dtype, gemm_impl=gemm, batch_size=8,
                 seq_len=512, prefill_chunk=chunk)
    p = plan(SMALL, world, layout, gemm, 100.0, 8, 512, chunk, dtype=dtype, moe_comm=comm)
    assert s.impl.gemm_impl == gemm and s.dtype == dtype
    assert p.cache == s.cache and s.weights == weight_bytes(SMALL, world, 0, layout, gemm, False, dtype)
    # the planner's activations bound the code's from above, by at most 25% (scores, expert buffers and
    # the logits counted as if all alive at once), and the whole plan is within 12% of the peak
    assert 1 <= (p.activations + p.derived) / s.activations < 1.25, (p.activations + p.derived) / s.activations
    assert 1 <= ratio(p, s) < 1.12, ratio(p, s)


def test_the_mode_counts_what_is_alive_and_its_peak():
    with torch._subclasses.fake_tensor.FakeTensorMode(), SimulationMode("cpu", 1, 0) as mode:
        with mode.phase("a") as a:
            x = torch.empty(1000, dtype=torch.float32)
            y = x * 2  # 4000 more bytes
            assert mode.live == 8000
            del x, y
        assert mode.live == 0 and a.peak == 8000 and mode.peak == 8000
        z = torch.empty(10, dtype=torch.bfloat16)
        assert mode.live == 20 and z.shape == (10,)
        # small integer tensors carry their values, so the host may read them back
        assert torch.arange(5).sum().item() == 10
        with pytest.raises(SimulationError, match="read back a value computed from weights or activations"):
            torch.empty(3).sum().item()


def test_a_launch_that_does_not_fit_is_seen_by_both():
    # bf16 GEMMs dequantize the 671B FP8 weights to bf16: about 170 GB a GPU on one node
    p = plan(RELEASE, 8, "tp", "bf16", H200 / GIB, 32, 4096)
    assert not p.fits and math.isclose(p.weights / 1e9, 170, rel_tol=0.02), p.weights / 1e9
