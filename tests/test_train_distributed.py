"""Training across processes (dsv3ref.train.distributed): every layout and schedule equals the
single-process loop on the same global batch, in float64, on gloo; resume is exact; the schedules'
own action lists give the report's Table 2 bubbles.

The reference is `dsv3ref.train.train` (the single-process loop, an independent code path: one model,
`model.loss`, `clip_grad_norm_`, one AdamW), run here once in float64. Tolerance 1e-10: the
distributed step computes the same sums in another order (micro-batch means averaged, gradients
summed over ranks, the clip norm from per-rank sums), which moves float64 results by ~1e-16 relative
per step; what was measured is at most 3e-13 after 3 steps, and a wrong gradient sum or a lost
all-reduce moves them by 1e-3 or more.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import free_port
from safetensors.torch import load_file, save_file
from train_parallel_worker import corpus  # the worker's data, shared

from dsv3ref import DeepseekV3, ModelConfig
from dsv3ref.checkpoint import CheckpointError
from dsv3ref.train import TrainConfig, build_model, train
from dsv3ref.train.data import batch
from dsv3ref.train.distributed import Layout
from dsv3ref.train.distributed.checkpoint import export_pretrained, gather_weights
from dsv3ref.train.distributed.cost import footprint
from dsv3ref.train.distributed.layout import split_layers
from dsv3ref.train.distributed.timeline import Costs, action_lists, play, table2_bubble
from dsv3ref.train.loop import mtp_weight

HERE = Path(__file__).parent

TOL = 1e-10
MODEL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64,
             moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The single-process loop's run: 3 steps of a 4-layer model (1 dense + 3 MoE layers + an MTP module,
    8 experts), global batch 16 x 16, float64, warmup 1 so the learning rate moves, clip at 1.0."""
    ref = tmp_path_factory.mktemp("reference")
    cfg = TrainConfig(out_dir=str(ref / "run"), steps=3, batch_size=16, seq_len=16, dtype="float64", model=MODEL,
                      progress=False, eval_every=3, eval_batches=1, warmup=1, max_corpus_bytes=None)
    settings = dataclasses.asdict(cfg)
    settings.pop("out_dir")
    (ref / "config.json").write_text(json.dumps(settings))
    data = corpus()
    model = build_model(cfg)
    model.loss(batch(data.train, cfg.batch_size, cfg.seq_len, cfg.seed, 0), mtp_weight(cfg, 0))["loss"].backward()
    save_file({n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None},
              ref / "grads.safetensors")
    train(cfg, corpus=data)
    rows = [json.loads(line) for line in (ref / "run" / "metrics.jsonl").read_text().splitlines()]
    (ref / "metrics.json").write_text(json.dumps(rows))
    final = {}
    for file in (ref / "run" / "step_000003").glob("model*.safetensors"):
        final.update(load_file(file))
    save_file(final, ref / "final.safetensors")
    return ref


def _run_workers(world: int, reference: Path, out: Path, cases: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                           "--master-port", str(free_port()), str(HERE / "train_parallel_worker.py"), str(reference),
                           str(out), *cases],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=400)
    errors = "".join(p.read_text() for p in out.glob("error_*.txt"))
    assert done.returncode == 0, errors or done.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def _assert_equal_to_one_process(results: dict) -> None:
    experts = results.pop("experts")  # the expert-parallel layer alone (see train_parallel_worker.experts_case)
    assert experts["random"] < TOL and experts["all to rank 0"] < TOL, experts
    for case, r in results.items():
        assert r["grad"] < TOL and r["weights"] < TOL and r["bias"] == 0.0 and r["loss"] < TOL, (case, r)
        assert r["grad_presence_mismatch"] == 0 and r["params"] > 100 and r["biases_compared"] >= 4, (case, r)
        if "resume" in case:
            assert r["resume_differs"] == 0, (case, r)


def test_two_processes_equal_one_for_every_schedule_and_each_of_pp_ep_dp(reference, tmp_path):
    """World 2: the expert-parallel layer alone (a rank that receives no tokens included); pp 2 under each
    schedule (resumed from step 2 under DualPipeV), ep 2, dp 2."""
    cases = ["experts", "2,1,1,gpipe", "2,1,1,1f1b", "2,1,1,zb1p", "2,1,1,zbv", "2,1,1,dualpipev,resume",
             "1,2,1,dualpipev", "1,1,2,zbv"]
    _assert_equal_to_one_process(_run_workers(2, reference, tmp_path, cases))


def test_four_processes_equal_one_for_combined_layouts(reference, tmp_path):
    """World 4: pp 4 (1F1B, ZB1P: the first rank's embedding has a copy on the last), pp x ep under DualPipeV
    (resumed) and ZB1P, pp x dp under ZBV, ep x dp, ep 4, dp 4."""
    cases = ["experts", "4,1,1,1f1b", "4,1,1,zb1p", "2,2,1,dualpipev,resume", "2,2,1,zb1p", "2,1,2,zbv", "1,2,2,1f1b",
             "1,4,1,gpipe", "1,1,4,1f1b"]
    _assert_equal_to_one_process(_run_workers(4, reference, tmp_path, cases))


def test_torchrun_train_prints_the_losses_one_process_prints(tmp_path):
    """The command line: `torchrun ... -m dsv3ref train --pp 2 --ep 2 --schedule dualpipev` in float64 gives
    the single-process command's losses (its last line, rounded to 4 digits, is the same)."""
    args = ["train", "--steps", "2", "--batch-size", "8", "--seq-len", "16", "--dtype", "float64", "--warmup", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "dsv3ref", *args, "--out-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
                            str(free_port()), "-m", "dsv3ref", *args, "--out-dir", str(tmp_path / "four"), "--pp", "2",
                            "--ep", "2", "--schedule", "dualpipev", "--microbatches", "4", "--timeout", "120"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0 and multi.returncode == 0, multi.stderr[-3000:]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    four = [json.loads(line) for line in (tmp_path / "four" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in four] == [1, 2]
    for a, b in zip(one, four, strict=True):
        assert abs(a["loss"] - b["loss"]) < TOL and abs(a["mtp_loss"] - b["mtp_loss"]) < TOL
        assert abs(a["grad_norm"] - b["grad_norm"]) < TOL
    assert "pp 2 x ep 2 x dp 1, schedule dualpipev" in multi.stderr
    assert sorted(p.name for p in (tmp_path / "four" / "step_000002").iterdir()) == [
        "rank_00000.safetensors", "rank_00001.safetensors", "rank_00002.safetensors", "rank_00003.safetensors",
        "train_state.json"]

    # the run's model, gathered from the rank files into the published format, is the single process's
    export_pretrained(tmp_path / "four" / "step_000002", tmp_path / "exported")
    exported = DeepseekV3.from_pretrained(tmp_path / "exported", dtype=torch.float64)
    saved = DeepseekV3.from_pretrained(tmp_path / "one" / "step_000002", dtype=torch.float64)
    for (name, a), (_, b) in zip(exported.state_dict().items(), saved.state_dict().items(), strict=True):
        assert (a - b).abs().max() < TOL, name

    # resuming on another layout is refused by name, on every rank, without a traceback
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(free_port()), "-m", "dsv3ref", *args, "--out-dir", str(tmp_path / "four"),
                            "--pp", "2", "--schedule", "dualpipev", "--timeout", "60",
                            "--resume", str(tmp_path / "four" / "step_000002")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode != 0 and "a distributed checkpoint resumes on the same layout" in again.stderr
    assert 'File "' + str(HERE.parent / "dsv3ref") not in again.stderr

    # a new run into that folder: rank 0 refuses to overwrite it and the other rank stops too, at once
    over = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "dsv3ref", *args, "--out-dir", str(tmp_path / "four"),
                           "--pp", "2", "--timeout", "60"], capture_output=True, text=True, env=env, timeout=120)
    assert over.returncode != 0 and "holds another run" in over.stderr, over.stderr[-2000:]
    assert 'File "' + str(HERE.parent / "dsv3ref") not in over.stderr


def test_replicas_that_differ_are_named(tmp_path):
    """gather_weights reads every rank file; a replicated tensor that differs between two is refused."""
    tensor = torch.zeros(2)
    save_file({"param/model.norm.weight": tensor}, tmp_path / "rank_00000.safetensors")
    save_file({"param/model.norm.weight": tensor + 1}, tmp_path / "rank_00001.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight: differs between rank_00000.safetensors and "
                                              "rank_00001.safetensors"):
        gather_weights(tmp_path)


def test_layout_flags_without_torchrun_say_how_to_launch(capsys, tmp_path):
    from dsv3ref.cli import main

    assert main(["train", "--pp", "2", "--out-dir", str(tmp_path / "x")]) == 2
    assert "launch with torchrun --nproc-per-node N -m dsv3ref train" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ layouts

def test_ranks_and_coordinates_round_trip_and_stages_form_a_v():
    layout = Layout(pp=2, ep=2, dp=3, schedule="dualpipev")
    assert [layout.coords(r) for r in range(layout.world_size)] == [
        (p, d, e) for p in range(2) for d in range(3) for e in range(2)]
    assert all(layout.rank(*layout.coords(r)) == r for r in range(12))
    assert layout.stages_of(0) == [0, 3] and layout.stages_of(1) == [1, 2] and layout.num_stages == 4
    assert Layout(pp=3).stages_of(2) == [2]
    assert [list(r) for r in split_layers(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize(("kwargs", "check", "message"), [
    (dict(pp=2), (3, 4, 8, 16), "layout: pp 2 x ep 1 x dp 1 = 2 ranks, but the job has 3"),
    (dict(pp=4, schedule="zbv"), (4, 4, 8, 16), "pp: 8 pipeline stages (zbv, pp=4) need at least as many"),
    (dict(ep=3), (3, 4, 8, 24), "ep: 3 does not divide the model's 8 routed experts"),
    (dict(dp=2, microbatches=3), (2, 4, 8, 16), "batch_size: 16 sequences do not split into 2 data shard(s)"),
])
def test_a_layout_that_cannot_run_names_the_setting(kwargs, check, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Layout(**kwargs).check(*check)


def test_layout_fields_are_checked_where_they_are_declared():
    with pytest.raises(ValueError, match="microbatches: DualPipeV needs at least one per stage"):
        Layout(pp=2, schedule="dualpipev", microbatches=3)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        Layout(schedule="interleaved")
    with pytest.raises(ValueError, match="pp: expected an integer >= 1, found 0"):
        Layout(pp=0)


def test_unsupported_training_settings_are_refused_by_name():
    from dsv3ref.train.distributed import DistributedRun

    with pytest.raises(ValueError, match="balance='aux'.*fp8=True is not supported across processes"):
        DistributedRun(TrainConfig(balance="aux", fp8=True), Layout(), timedelta(seconds=1))
    with pytest.raises(ValueError, match="attn_impl='absorb' is not supported across processes"):
        DistributedRun(TrainConfig(attn_impl="absorb"), Layout(), timedelta(seconds=1))


# ------------------------------------------------------------------------------------------------ timelines

def test_a_two_rank_1f1b_timeline_by_hand():
    """P=2, 2 micro-batches, F=1, B=2: rank 1 runs F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7]; rank 0 F0 [0,1]
    F1 [1,2] B0 [4,6] B1 [7,9]. Length 9, each rank busy 6: bubble 3 = (PP-1)(F+B)."""
    order, stages = action_lists("1f1b", 2, 2)
    t = play(order, stages, Costs(F=1, B=2, W=1, FB=3))
    spans = {(s.rank, s.kind, s.work[0][1]): (s.start, s.end) for s in t.slots}
    assert spans == {(0, "F", 0): (0, 1), (0, "F", 1): (1, 2), (1, "F", 0): (1, 2), (1, "B", 0): (2, 4),
                     (1, "F", 1): (4, 5), (1, "B", 1): (5, 7), (0, "B", 0): (4, 6), (0, "B", 1): (7, 9)}
    assert t.length == 9 and t.bubble == {0: 3, 1: 3}


def _costs():
    """Integer costs with the backward's input part I = B - W equal to F and W <= F (the report's setting,
    and the zero-bubble papers'), F&B between max(F, B) and F + B."""
    rng = random.Random(0)
    for _ in range(12):
        f = rng.randint(1, 6)
        w = rng.randint(1, f)
        b = f + w
        yield Costs(F=f, B=b, W=w, FB=rng.randint(b, f + b))


@pytest.mark.parametrize("pp", [4, 8])
def test_bubbles_from_torchs_action_lists_equal_table_2(pp):
    """1F1B: (PP-1)(F+B) on every rank; ZB1P: (PP-1)(F+B-2W) on every rank; DualPipeV: on its slowest rank,
    DualPipe's (PP/2-1)(F&B+B-3W) with PP = 2 pp (DualPipeV is DualPipe cut in half)."""
    lists = {s: action_lists(s, pp, 2 * pp) for s in ("1f1b", "zb1p", "dualpipev")}
    for costs in _costs():
        for schedule, (order, stages) in lists.items():
            bubble = play(order, stages, costs).bubble
            if schedule == "dualpipev":
                assert max(bubble.values()) == table2_bubble(schedule, pp, costs), (costs, bubble)
            else:  # integer costs: exact
                assert set(bubble.values()) == {table2_bubble(schedule, pp, costs)}, (schedule, costs, bubble)


def test_table_2_counts_assume_the_input_backward_costs_a_forward():
    """With I = B - W != F the same lists give other bubbles than the formulas (here F=2, B=4, W=1 on 4
    ranks: DualPipeV 16 against 18), which the lesson shows."""
    order, stages = action_lists("dualpipev", 4, 8)
    costs = Costs(F=2, B=4, W=1, FB=5)
    assert max(play(order, stages, costs).bubble.values()) == 16 and table2_bubble("dualpipev", 4, costs) == 18


@pytest.mark.parametrize("pp", [4, 8])
def test_activation_memory_of_the_schedules(pp):
    """Table 2's activation column: ZB1P PP micro-batches on every rank; DualPipeV 2 pp + 1 stage chunks
    (DualPipe's PP + 1 with PP = 2 pp). torch's 1F1B (the interleaved schedule with one stage per rank)
    holds 2 (pp - rank) - 1 on rank `rank`: its warm-up is deeper than the textbook's pp - rank."""
    peaks = {s: play(*action_lists(s, pp, 2 * pp), Costs()).peak_activations for s in ("1f1b", "zb1p", "dualpipev")}
    assert set(peaks["zb1p"].values()) == {pp}
    assert set(peaks["dualpipev"].values()) == {2 * pp + 1}
    assert peaks["1f1b"] == {r: 2 * (pp - r) - 1 for r in range(pp)}


# ------------------------------------------------------------------------------------------------ the full layout

def test_the_reports_layout_per_gpu_equals_a_count_written_out():
    """DeepSeek-V3 on 2,048 GPUs as PP16 x EP64: pipeline rank 0 (the heaviest) holds the embedding, the three
    dense layers and MoE layer 3 with 4 of its 256 experts. Counted here from the config's shapes."""
    c = ModelConfig.preset("deepseek-v3")
    h, heads = c.hidden_size, c.num_attention_heads
    attention = (h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
                 + h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
                 + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) + heads * c.v_head_dim * h)
    dense_layer = attention + 3 * h * c.intermediate_size + 2 * h
    moe_layer_shared = attention + c.n_routed_experts * h + 3 * h * c.moe_intermediate_size + 2 * h  # router, shared
    expert = 3 * h * c.moe_intermediate_size
    dense = c.vocab_size * h + 3 * dense_layer + moe_layer_shared
    experts = (c.n_routed_experts // 64) * expert
    f = footprint(c)
    assert (f.dense_params, f.expert_params) == (dense, experts) == (2_910_126_080, 176_160_768)  # the bias: a buffer
    held, sharded = dense + experts, dense / 128 + experts / 2  # replicas: 2048 / 16 dense, 2048 / (16 x 64) experts
    assert f.bytes == {"weights (BF16)": 2 * held, "gradients (FP32)": 4 * held,
                       "master weights (FP32, ZeRO-1)": round(4 * sharded),
                       "AdamW moments (BF16, ZeRO-1)": round(4 * sharded)}
    # one token, one MoE layer, forward: 4 nodes x (FP8 hidden + a float32 scale per 128 + 8 x (id, weight)) out,
    # 4 x BF16 hidden back
    assert f.ib_bytes_per_token == 4 * ((7168 + 4 * 56 + 8 * 12) + 2 * 7168) == 87_296
    assert footprint(c, nodes_per_token=8).ib_bytes_per_token == 2 * f.ib_bytes_per_token
