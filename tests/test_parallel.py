"""Scale-out (dsv3ref.parallel): multi-process runs against the single-process model, sharded
loading, the memory planner against the code, torchrun, and clear errors.

The multi-process tests start world_size processes of tests/parallel_worker.py (gloo on the CPU,
OMP_NUM_THREADS=1, a 60 s timeout on every collective), one process group per world size with many
cases inside. Each case compares float64 logits and greedy tokens with DeepseekV3.from_pretrained of
the same checkpoint: relative error below 1e-10 (the split only regroups float64 sums: measured
~2e-15), identical tokens; two float32 cases: below 1e-5.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import free_port, randomize_, tiny_config
from safetensors import safe_open
from torch.testing._internal.distributed.fake_pg import FakeStore

import dsv3ref
from dsv3ref import DeepseekV3, ModelConfig
from dsv3ref.convert import convert
from dsv3ref.parallel import Parallel, ParallelError, parallelize, parameter_bytes
from dsv3ref.parallel.launch import LaunchError, init_from_env
from dsv3ref.parallel.planner import cache_bytes_per_token, checkpoint_bytes, machine_table, plan, weight_bytes

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-10
TOLERANCE_F32 = 1e-5  # float32: the ranks' partial sums are added in another order (measured 7e-7 to 1.3e-6)
LAYOUTS = [("tp", "allreduce"), ("tp", "alltoall"), ("dp", "allreduce"), ("dp", "alltoall")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoints in the published format, each in shards holding many tensors:
    "bf16": a tiny model (sizes that do not fall on the 128-block grid) with an MTP module;
    "fp8u": the same converted to FP8 (a tensor-parallel split falls inside its blocks);
    "fp8a": a tiny model whose head splits fall on the 128-block grid at 2 and 4 ranks, in FP8
    (its 384-wide dense FFN gives 4 ranks 1, 1, 1 and 0 blocks; its 128-wide shared expert one rank)."""
    tmp = tmp_path_factory.mktemp("parallel")
    cfg = tiny_config(vocab_size=512, num_nextn_predict_layers=1)
    dsv3ref.save_pretrained(randomize_(DeepseekV3(cfg), 3).eval(), tmp / "bf16", max_shard_bytes=200_000)
    convert(tmp / "bf16", tmp / "fp8u", "bf16-to-fp8")
    aligned = tiny_config(vocab_size=512, hidden_size=128, num_attention_heads=8, q_lora_rank=64, kv_lora_rank=64,
                          qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, intermediate_size=384,
                          moe_intermediate_size=128, num_nextn_predict_layers=1)
    dsv3ref.save_pretrained(randomize_(DeepseekV3(aligned), 4).eval(), tmp / "bf16a", max_shard_bytes=400_000)
    convert(tmp / "bf16a", tmp / "fp8a", "bf16-to-fp8")
    return tmp


def run_world(world: int, cases: list[dict], tmp: Path, timeout_s: float = 60) -> dict:
    """Start `world` worker processes on these cases; returns {case: [rank 0's result, ...]}."""
    spec = tmp / f"spec{world}.json"
    out = tmp / f"results{world}.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(out), "timeout_s": timeout_s}))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "parallel_worker.py"), str(spec)],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        logs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in logs)
    return json.loads(out.read_text())


def _cases(ckpts: Path, world: int) -> list[dict]:
    cases = []
    combos = [(a, m, lay, comm) for a in ("naive", "absorb") for m in ("loop", "grouped") for lay, comm in LAYOUTS]
    if world == 4:  # every value of every choice, in half the cases (world 2 runs all of them)
        combos = combos[::2] + [combos[-1]]
    for attn, moe, layout, comm in combos:
        cases.append(dict(name=f"bf16 {attn} {moe} {layout} {comm}", ckpt=str(ckpts / "bf16"), attn_impl=attn,
                          moe_impl=moe, layout=layout, moe_comm=comm))
    fp8_combos = (("naive", "tp", "allreduce"), ("absorb", "tp", "alltoall"), ("absorb", "dp", "alltoall"))
    for attn, layout, comm in fp8_combos:
        cases.append(dict(name=f"fp8a fp8 {attn} {layout} {comm}", ckpt=str(ckpts / "fp8a"), attn_impl=attn,
                          moe_impl="loop", layout=layout, moe_comm=comm, gemm_impl="fp8"))
    cases.append(dict(name="fp8a dequantized absorb tp allreduce", ckpt=str(ckpts / "fp8a"), attn_impl="absorb",
                      moe_impl="grouped", layout="tp", moe_comm="allreduce", gemm_impl="bf16"))
    for layout, comm in (("tp", "alltoall"), ("dp", "allreduce")):  # float32: sums regrouped, so rounding differs
        cases.append(dict(name=f"float32 bf16 absorb grouped {layout} {comm}", ckpt=str(ckpts / "bf16"),
                          attn_impl="absorb", moe_impl="grouped", layout=layout, moe_comm=comm, dtype="float32"))
    cases.append(dict(name="fp8u dequantized naive tp allreduce", ckpt=str(ckpts / "fp8u"), attn_impl="naive",
                      moe_impl="grouped", layout="tp", moe_comm="allreduce", gemm_impl="bf16"))
    cases.append(dict(name="fp8u fp8 naive tp (split inside a block)", ckpt=str(ckpts / "fp8u"), attn_impl="naive",
                      moe_impl="loop", layout="tp", moe_comm="allreduce", gemm_impl="fp8"))
    return cases


def _gradient_cases(ckpts: Path, world: int) -> list[dict]:
    cases = []
    for moe in ("loop", "grouped"):
        for layout, comm in LAYOUTS:
            cases.append(dict(name=f"grad {moe} {layout} {comm}", kind="grad", ckpt=str(ckpts / "bf16"),
                              attn_impl="naive" if moe == "loop" else "absorb", moe_impl=moe, layout=layout,
                              moe_comm=comm))
    return cases if world == 2 else cases[4:]


def _file_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor of a checkpoint, from its safetensors headers."""
    size = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "F8_E4M3": 1}
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = int(torch.tensor(sl.get_shape()).prod()) * size[sl.get_dtype()]
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_model_equals_single_process(world, checkpoints, tmp_path):
    results = run_world(world, _cases(checkpoints, world), tmp_path)
    for name, ranks in results.items():
        r0 = ranks[0]
        assert "crash" not in r0, f"{name}: {r0['crash']}"
        if "split inside a block" in name:
            assert "error" in r0 and "inside a 128x128 block" in r0["error"] and f"world size {world}" in r0["error"]
            assert "q_b_proj.weight of shape (80, 24)" in r0["error"], r0["error"]
            continue
        assert r0["logits_rel_err"] < (TOLERANCE_F32 if name.startswith("float32") else TOLERANCE), (name, r0)
        # a split absorbed model with heads over the ranks also decodes over a paged cache (in logits_rel_err)
        assert r0.get("paged_checked", False) == (" absorb " in name and " tp " in name), name
        assert r0["tokens_equal"] and r0["chunked_equal"], name
        assert r0.get("speculative_equal", True), name
        if "few_equal" in r0:  # dp: a rank without a prompt, a row ended early, a row ended by its last token
            assert r0["few_equal"] and r0["eos_cases"] == [True, True], (name, r0["eos_cases"])
        for rank in ranks:
            assert rank["whole_split_reads"] == [], (name, rank["whole_split_reads"])
            assert rank["bytes_logged"] == rank["bytes_read"]  # the loader's count = what the files gave out
            assert rank["bytes_read"] < rank["reference_bytes_read"]
        if name.startswith("bf16"):
            # each rank reads its part of every split tensor and its own experts: over the ranks these add
            # up to the whole file once, plus the replicated tensors once more per further rank
            total = sum(_file_bytes(checkpoints / "bf16").values())
            assert sum(r["bytes_read"] for r in ranks) == total + (world - 1) * ranks[0]["replicated_bytes"], name


@pytest.mark.parametrize("world", [2, 4])
def test_gradients_through_the_split_model_equal_one_process(world, checkpoints, tmp_path):
    """float64, next-token loss over a batch; every parameter of every rank (see parallel_worker.gradients
    for what "equal" means under each layout). Bound 1e-10: the split only regroups float64 sums."""
    results = run_world(world, _gradient_cases(checkpoints, world), tmp_path)
    for name, ranks in results.items():
        for rank in ranks:
            assert "crash" not in rank, f"{name}: {rank['crash']}"
            assert rank["missing_grads"] == [] and rank["tensors"] > 20, (name, rank)
            assert rank["grad_rel_err"] < TOLERANCE, (name, rank)


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_handed_to_collectives_equal_the_formula(world, checkpoints, tmp_path):
    """One prefill pass and one decode step, every layout and exchange, bf16 and float64: the bytes of
    every input handed to torch's functional collectives (logged by a dispatch mode, apart from the
    code) equal dsv3ref.parallel.planner.exchange_bytes (the formula notebook 08 draws), exactly."""
    cases = [dict(name=f"bytes {dtype} {layout} {comm}", kind="bytes", ckpt=str(checkpoints / "bf16"), dtype=dtype,
                  attn_impl="absorb", moe_impl="grouped", layout=layout, moe_comm=comm)
             for dtype in ("bfloat16", "float64") for layout, comm in LAYOUTS]
    results = run_world(world, cases if world == 2 else cases[:4], tmp_path)
    for name, ranks in results.items():
        for rank in ranks:
            assert "crash" not in rank, f"{name}: {rank['crash']}"
            for phase in ("prefill", "decode"):
                assert rank[phase]["counted"] == rank[phase]["formula"], (name, phase, rank[phase])


def test_a_split_model_decodes_compiled_in_one_graph_with_the_eager_tokens(checkpoints, tmp_path):
    """World 2, layout tp with the all-reduce exchange (what --compile under torchrun takes): one graph
    for 20 decode steps (dynamo's CompileCounter, recompiling an error), both expert implementations;
    with inductor, generate(compile=True) gives the eager tokens, which are one process's."""
    cases = [dict(name=f"compile {moe}", kind="compile", ckpt=str(checkpoints / "bf16"), dtype="float32",
                  attn_impl="absorb", moe_impl=moe, layout="tp", moe_comm="allreduce", inductor=moe == "grouped")
             for moe in ("loop", "grouped")]
    results = run_world(2, cases, tmp_path, timeout_s=240)
    for name, ranks in results.items():
        for rank in ranks:
            assert "crash" not in rank, f"{name}: {rank['crash']}"
            assert rank["graphs"] == 1, (name, rank)
            if name == "compile grouped":
                assert rank["compiled_equal"] and rank["single_equal"], rank


def test_a_dead_rank_fails_the_others_instead_of_hanging(checkpoints, tmp_path):
    spec = [dict(name="die", die_rank=1)]
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"cases": spec, "out": str(tmp_path / "r.json"), "timeout_s": 10}))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "parallel_worker.py"), str(spec_file)],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    logs = [p.communicate(timeout=120) for p in procs]
    assert procs[1].returncode == 3  # the rank that died
    assert procs[0].returncode != 0 and "collective failed" in logs[0][1], logs[0][1][-2000:]


# ------------------------------------------------------------------------------------------- in one process
@pytest.fixture
def fake_world():
    """A process group of any size inside this process (torch's fake backend: collectives do nothing)."""
    def start(world: int, rank: int = 0):
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def test_world_sizes_that_do_not_divide_get_a_clear_error(fake_world):
    fake_world(3)
    with pytest.raises(ParallelError, match=r"n_routed_experts=8 cannot be split evenly over world size 3"):
        parallelize(DeepseekV3(tiny_config()))
    fake_world(8)
    with pytest.raises(ParallelError, match=r"num_attention_heads=4 cannot be split evenly over world size 8"):
        parallelize(DeepseekV3(tiny_config(vocab_size=512)))


def test_world_size_one_leaves_the_model_unchanged(fake_world):
    fake_world(1)
    model = DeepseekV3(tiny_config())
    before = {n: t.clone() for n, t in model.state_dict().items()}
    assert parallelize(model) == {} and model.parallel.world_size == 1
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert not any(m._forward_hooks for m in model.modules())


def test_planner_matches_the_released_checkpoint():
    cfg = ModelConfig.preset("deepseek-v3")
    assert checkpoint_bytes(cfg) == (688_574_839_360, 684_531_386_000)  # the release's files, the card's "685B"
    assert cache_bytes_per_token(cfg) == 70_272
    assert round(weight_bytes(cfg, 8) / 1e9, 1) == 85.1 and round(weight_bytes(cfg, 16) / 1e9, 1) == 43.1


def test_planner_equals_the_parallel_model_on_the_meta_device(fake_world):
    """The full model (MTP module included) built on the meta device and cut by parallelize under a fake
    process group: its bytes per rank equal the planner's, for several world sizes and ranks (uneven
    FFN splits at 32 and 64 ranks: the last rank holds fewer blocks)."""
    cfg = ModelConfig.preset("deepseek-v3")
    with torch.device("meta"):
        base = DeepseekV3(cfg, gemm_impl="fp8").to(torch.bfloat16)
    cases = [(8, 0), (16, 15), (32, 31), (64, 0)]
    for i, (world, rank) in enumerate(cases):
        model = base if i == len(cases) - 1 else copy.deepcopy(base)
        fake_world(world, rank)
        parallelize(model, parallel=Parallel("tp"))
        assert parameter_bytes(model) == weight_bytes(cfg, world, rank, "tp", "fp8", mtp=True), (world, rank)


def test_the_data_parallel_plan_equals_a_count_written_out():
    """DeepSeek-V3 on 16 GPUs, data-parallel attention, FP8 GEMMs, bf16 elsewhere, 32 x 4096 tokens:
    weights, cache, derived tensors and the tokens that fit, counted here from the report's shapes
    (not with the planner's split functions). The activations are the planner's; tests/test_simulate.py
    holds them against the launch's code run at full size."""
    cfg = ModelConfig.preset("deepseek-v3")

    def fp8(out: int, inp: int) -> int:  # E4M3 bytes + one float32 scale per 128 x 128 block
        return out * inp + 4 * -(-out // 128) * -(-inp // 128)
    d, v, world = 7168, 129_280, 16
    attention = (2 * 2 * d                                       # input and post-attention RMSNorm gains
                 + fp8(1536, d) + 2 * 1536                         # q_a_proj, q_a_layernorm
                 + fp8(128 * 192, 1536)                            # q_b_proj: 128 heads x (128 nope + 64 rope)
                 + fp8(512 + 64, d) + 2 * 512                      # kv_a_proj_with_mqa, kv_a_layernorm
                 + fp8(128 * 256, 512)                             # kv_b_proj: 128 heads x (128 nope + 128 v)
                 + fp8(d, 128 * 128))                              # o_proj
    dense_ffn = 2 * fp8(18432, d) + fp8(d, 18432)
    expert = 2 * fp8(2048, d) + fp8(d, 2048)
    moe = 2 * 256 * d + 4 * 256 + (256 // world) * expert + expert  # router, its float32 bias, 16 experts, shared
    weights = 2 * 2 * v * d + 2 * d + 61 * attention + 3 * dense_ffn + 58 * moe  # every rank holds all attention
    p = plan(cfg, world, "dp", "fp8", 80.0, batch_size=32, seq_len=4096, moe_comm="alltoall")
    assert p.weights == weights == 59_961_471_328  # 55.84 GiB
    assert p.cache == 2 * 4096 * 61 * (512 + 64) * 2 + 61 * 2 * 8  # 32 rows over 16 ranks: 2 rows each
    assert p.derived == 61 * 128 * 256 * 512 * 2  # kv_b_proj dequantized to bf16 for absorbed attention
    left = int(80.0 * 2**30) - weights - p.derived - p.activations - 3 * 2**30
    assert p.cache_tokens_fit == left // (61 * 576 * 2) and p.total_tokens_fit == 16 * p.cache_tokens_fit


def test_planner_says_what_fits():
    rows = {(r["machine"], r["layout"]): r for r in machine_table(ModelConfig.preset("deepseek-v3"))}
    assert rows["1x8 H200-141GB", "tp"]["fits"] and rows["2x8 H100-80GB", "tp"]["fits"]
    assert rows["2x8 H800-80GB", "dp"]["fits"] and rows["2x8 H200-141GB", "tp"]["fits"]
    assert not rows["1x8 H100-80GB", "tp"]["fits"]  # 85.1 GB of FP8 weights per GPU > 80 GB
    dp, tp = rows["1x8 H200-141GB", "dp"], rows["1x8 H200-141GB", "tp"]
    assert dp["weights_gib"] > tp["weights_gib"] and dp["tokens_fit_total"] > tp["tokens_fit_total"]
    with pytest.raises(ValueError, match="world_size: expected a positive integer, found 0"):
        plan(ModelConfig.preset("deepseek-v3"), 0)
    with pytest.raises(ValueError, match="n_routed_experts=256 cannot be split evenly over world size 3: choose a "
                       "world size that divides it"):
        plan(ModelConfig.preset("deepseek-v3"), 3)


def test_missing_torchrun_variables_are_named(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        init_from_env()


# ------------------------------------------------------------------------------------------------ torchrun
@pytest.mark.parametrize("layout", ["tp", "dp"])
def test_torchrun_generate_prints_what_one_process_prints(text_checkpoint, layout):
    args = ["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "Hello!", "--max-new-tokens", "6"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "dsv3ref", *args], capture_output=True, text=True, env=env,
                            timeout=120)
    parallel = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port()), "-m", "dsv3ref", *args, "--layout", layout,
                               "--moe-comm", "alltoall", "--timeout", "60"],
                              capture_output=True, text=True, env=env, timeout=180)
    assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout == single.stdout and single.stdout.strip()  # rank 0 alone prints
    assert f"rank 0 of 2, layout {layout}" in parallel.stderr and "rank 1" not in parallel.stderr


def test_torchrun_with_a_world_size_that_does_not_fit_says_so(text_checkpoint):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port",
                           str(free_port()), "-m", "dsv3ref", "generate", "--ckpt-path", str(text_checkpoint),
                           "--prompt", "x", "--timeout", "30"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=180)
    assert done.returncode != 0
    assert "error: world size 3 does not fit this model: n_routed_experts=8 cannot be split evenly over world size 3" \
        in done.stderr, done.stderr[-2000:]
    assert 'File "' + str(ROOT / "dsv3ref") not in done.stderr  # no traceback from inside dsv3ref


def test_layout_flags_without_torchrun_say_how_to_launch(text_checkpoint, monkeypatch, capsys):
    from dsv3ref.cli import main

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code = main(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "x", "--layout", "dp"])
    assert code == 2 and "launch with torchrun --nproc-per-node N" in capsys.readouterr().err
