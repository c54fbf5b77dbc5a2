"""Checkpoint reading and writing in the published layout, and its error messages."""

import json

import pytest
import torch
from helpers import random_dsv3ref, tiny_config
from safetensors.torch import load_file, save_file

import dsv3ref
from dsv3ref import CheckpointError, DeepseekV3


@pytest.fixture
def saved(tmp_path):
    cfg = tiny_config()
    model = random_dsv3ref(cfg, seed=5)
    dsv3ref.save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_reproduces_logits_bit_for_bit(saved, tmp_path):
    model, path = saved
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    again = DeepseekV3.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    dsv3ref.save_pretrained(again, tmp_path / "twice")
    assert load_file(tmp_path / "twice" / "model.safetensors").keys() == load_file(path / "model.safetensors").keys()
    assert not list(path.glob(".*tmp"))


def test_names_follow_the_published_layout(saved):
    _, path = saved
    names = set(load_file(path / "model.safetensors"))
    for expected in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                     "model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                     "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                     "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.gate.weight",
                     "model.layers.1.mlp.gate.e_score_correction_bias",
                     "model.layers.1.mlp.shared_experts.up_proj.weight"]:
        assert expected in names


def test_sharded_checkpoint_with_index_loads(saved, tmp_path):
    model, _ = saved
    dsv3ref.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(DeepseekV3.from_pretrained(tmp_path / "sharded")(ids), model(ids))
    # writing a single file over the sharded folder leaves no stale index behind
    dsv3ref.save_pretrained(model, tmp_path / "sharded")
    assert not (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "model.safetensors"]


def test_dtype_and_bf16_checkpoints(saved, tmp_path):
    model, path = saved
    m64 = DeepseekV3.from_pretrained(path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    bf16 = DeepseekV3.from_pretrained(path, dtype=torch.bfloat16)
    dsv3ref.save_pretrained(bf16, tmp_path / "bf16")
    assert load_file(tmp_path / "bf16" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    back = DeepseekV3.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.bfloat16().float())


def test_mtp_layer_tensors_do_not_break_loading(saved):
    model, path = saved
    tensors = load_file(path / "model.safetensors")
    n = model.config.num_hidden_layers
    mtp = {f"model.layers.{n}.enorm.weight": torch.ones(48), f"model.layers.{n}.eh_proj.weight": torch.zeros(48, 96)}
    save_file(tensors | mtp, path / "model.safetensors", metadata={"format": "pt"})
    loaded = DeepseekV3.from_pretrained(path)
    assert loaded.unused_tensors == sorted(mtp)


def _rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.2.self_attn.kv_b_proj.weight"):
        DeepseekV3.from_pretrained(path)


def test_misshapen_tensor_is_named_with_both_shapes(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.norm.weight": torch.ones(47)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.norm.weight has shape \(47,\), "
                                              r"expected \(48,\)"):
        DeepseekV3.from_pretrained(path)


def test_unexpected_and_fp8_tensors_are_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": torch.ones(4)}))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.self_attn.rotary.inv_freq"):
        DeepseekV3.from_pretrained(path)
    _rewrite(path, lambda t: (t.pop("model.layers.0.self_attn.rotary.inv_freq"),
                              t.update({"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(1, 1)})))
    with pytest.raises(CheckpointError, match="stores FP8 block scales, so quantization_config.quant_method must be"):
        DeepseekV3.from_pretrained(path)


def test_integer_tensor_is_refused(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.norm.weight": torch.ones(48, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match="model.norm.weight has dtype I32"):
        DeepseekV3.from_pretrained(path)


def test_folder_errors(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        DeepseekV3.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected model.safetensors or model.safetensors.index.json"):
        DeepseekV3.from_pretrained(tmp_path / "empty")
    _, path = saved
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-9.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shard model-9.safetensors"):
        DeepseekV3.from_pretrained(path)


def test_failed_save_leaves_no_partial_file(saved, tmp_path, monkeypatch):
    model, _ = saved
    import dsv3ref.atomic as ck

    def boom(data):  # the header is written; the first tensor's bytes fail
        raise OSError("disk full")

    monkeypatch.setattr(ck, "memoryview", boom, raising=False)
    with pytest.raises(OSError, match="disk full"):
        dsv3ref.save_pretrained(model, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_arguments_are_clear(saved):
    model, path = saved
    with pytest.raises(ValueError, match="attn_impl: found 'flash'"):
        DeepseekV3.from_pretrained(path, attn_impl="flash")
    with pytest.raises(ValueError, match="moe_impl: found 'fast'"):
        DeepseekV3.from_pretrained(path, moe_impl="fast")
    with pytest.raises(ValueError, match="dtype: expected a floating"):
        DeepseekV3.from_pretrained(path, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="exceed max_position_embeddings=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="expected an integer tensor"):
        model(torch.zeros(1, 3))


def test_each_file_is_opened_once_headers_tensors_and_scales_through_one_handle(tmp_path, monkeypatch):
    """A load opens every safetensors file once (the release has 163; opening a shard again for each FP8
    weight's scales re-parses its header thousands of times), also with a parallel plan's slices."""
    from dsv3ref import checkpoint
    from dsv3ref.convert import convert
    cfg = tiny_config(hidden_size=128, num_nextn_predict_layers=1)
    dsv3ref.save_pretrained(random_dsv3ref(cfg, 3), tmp_path / "bf16", max_shard_bytes=150_000)
    convert(tmp_path / "bf16", tmp_path / "fp8", "bf16-to-fp8")
    files = set(json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(files) >= 4
    opened = []
    real = checkpoint.safe_open

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "safe_open", counting)
    for gemm in ("fp8", "bf16"):  # FP8 kept with its scales, or dequantized on load
        opened.clear()
        model = DeepseekV3.from_pretrained(tmp_path / "fp8", gemm_impl=gemm, moe_impl="loop")
        assert sorted(str(p) for p in opened) == sorted(str(tmp_path / "fp8" / f) for f in files), gemm
        assert model.load_report.files_opened == len(files)


def _mapped(path) -> int:
    """How many of this process's memory mappings are of files in folder `path` (Linux)."""
    return sum(str(path) in line for line in open("/proc/self/maps"))


def test_weights_are_the_files_bytes_mapped_copy_on_write(saved, tmp_path):
    """mmap=True (the default): a weight stored in the dtype asked for is the file's bytes mapped
    privately: no copy at load, the file untouched by writes to the model; mmap=False and a dtype
    change copy into memory the model owns (no mapping left once loading is done)."""
    import gc
    import hashlib
    model, path = saved
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    mapped = DeepseekV3.from_pretrained(path)
    assert _mapped(path) >= 1
    weight = mapped.model.layers[0].self_attn.kv_b_proj.weight
    assert isinstance(weight, torch.nn.Parameter) and weight.requires_grad
    with torch.no_grad():
        assert torch.equal(mapped(ids), model(ids))
        for param in mapped.parameters():
            param.mul_(-1)  # copies the pages it writes; the file keeps its bytes
        assert torch.equal(DeepseekV3.from_pretrained(path, mmap=False)(ids), model(ids))
    assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() == digest
    del mapped, weight, param
    gc.collect()
    assert _mapped(path) == 0
    for kwargs in ({"mmap": False}, {"dtype": torch.float64}):
        owned = DeepseekV3.from_pretrained(path, **kwargs)
        gc.collect()
        assert _mapped(path) == 0, kwargs
        with torch.no_grad():
            assert torch.equal(owned(ids.clone()).float(), model.to(owned.dtype)(ids).float()), kwargs
        model.float()


def test_a_tied_head_stays_tied_when_loaded_mapped(tmp_path):
    cfg = tiny_config().replace(tie_word_embeddings=True)
    model = random_dsv3ref(cfg, seed=3)
    dsv3ref.save_pretrained(model, tmp_path / "tied")
    again = DeepseekV3.from_pretrained(tmp_path / "tied")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_stacked_experts_are_filled_in_place_not_stacked_from_copies(saved, monkeypatch):
    """moe_impl="grouped" keeps each layer's experts stacked; loading allocates the stacked tensors once
    and copies every expert into its slice. Collecting per-expert tensors and stacking them at the end
    (what load_state_dict's hook does) would hold the experts' memory twice (at 671B on a GPU: out of
    memory), so loading must not stack; the logits are the loop model's to the dtype's rounding."""
    import dsv3ref.experts

    model, path = saved
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))

    def stack(*args, **kwargs):
        raise AssertionError("per-expert tensors stacked while loading")

    monkeypatch.setattr(dsv3ref.experts.torch, "stack", stack)
    for kwargs in ({}, {"mmap": False}, {"dtype": torch.float64}):
        grouped = DeepseekV3.from_pretrained(path, moe_impl="grouped", **kwargs)
        experts = grouped.model.layers[1].mlp.experts
        assert not experts.gate_up_proj.is_meta and experts.gate_up_proj.requires_grad, kwargs
        assert torch.equal(experts.gate_up_proj[2, experts.inter_dim:].to(model.dtype),
                           model.model.layers[1].mlp.experts[2].up_proj.weight), kwargs
        monkeypatch.undo()
        loop = DeepseekV3.from_pretrained(path, **kwargs)  # the readable experts, one module each
        tol = 1e-12 if loop.dtype == torch.float64 else 1e-5
        with torch.no_grad():
            assert torch.allclose(grouped(ids), loop(ids), rtol=tol, atol=tol), kwargs
        monkeypatch.setattr(dsv3ref.experts.torch, "stack", stack)


def _data_starts(file) -> dict[str, tuple[int, int]]:
    """name -> (where its bytes start in the file, how many), read from the safetensors header."""
    import struct
    raw = open(file, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return {name: (8 + n + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0])
            for name, e in header.items() if name != "__metadata__"}


def test_written_tensors_start_on_64_byte_boundaries(tmp_path):
    """save_pretrained (one file and shards) and the converter start every tensor whose size is a
    multiple of 64 bytes on a 64-byte boundary of the file, so that a mapped weight is aligned."""
    from dsv3ref.atomic import DATA_ALIGNMENT
    from dsv3ref.convert import convert
    cfg = tiny_config(vocab_size=101)  # an embedding of 101 x 48 float32: not a multiple of 64 bytes
    model = random_dsv3ref(cfg, seed=2)
    dsv3ref.save_pretrained(model, tmp_path / "one")
    dsv3ref.save_pretrained(model, tmp_path / "shards", max_shard_bytes=20_000)
    convert(tmp_path / "one", tmp_path / "fp8", "bf16-to-fp8")
    files = [f for d in ("one", "shards", "fp8") for f in sorted((tmp_path / d).glob("*.safetensors"))]
    assert len(files) > 4
    odd = 0
    for file in files:
        for name, (start, nbytes) in _data_starts(file).items():
            if nbytes % DATA_ALIGNMENT == 0:
                assert start % DATA_ALIGNMENT == 0, (file.name, name, start)
            else:
                odd += 1
        assert load_file(file).keys() == _data_starts(file).keys()  # safetensors reads it as written
    assert odd >= 1  # the rule was exercised: an odd-sized tensor placed after the aligned ones


def test_a_file_with_unaligned_tensors_loads_bit_for_bit_by_copying_them(saved, tmp_path):
    """A checkpoint whose tensors sit 8 bytes off a 16-byte boundary (its header 8 bytes longer, as
    safetensors' own writer may leave it): mapped in place, MKL on an AVX2 CPU rounds some GEMMs
    differently; the loader copies such tensors into aligned memory, so the loaded model computes
    what the saved one does, bit for bit."""
    import struct
    model, path = saved
    raw = (path / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    (shifted / "config.json").write_bytes((path / "config.json").read_bytes())
    (shifted / "model.safetensors").write_bytes(struct.pack("<Q", n + 8) + raw[8:8 + n] + b" " * 8 + raw[8 + n:])
    assert all(start % 16 == 8 for start, _ in _data_starts(shifted / "model.safetensors").values())
    loaded = DeepseekV3.from_pretrained(shifted)
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        for m in (1, 2, 5):  # small batches, where the unaligned kernels differed
            assert torch.equal(loaded(ids[:1, :m]), model(ids[:1, :m]))


def test_layers_skip_their_own_random_draw_only_on_the_meta_device(monkeypatch):
    """dsv3ref.linear.Linear is nn.Linear, less the Kaiming draw on the meta device (where loading builds
    the model): on a real device it draws the same numbers from the same seed, so a seeded model's
    random weights are what nn.Linear gave them; on the meta device the draw is never called."""
    from torch import nn

    from dsv3ref.linear import Linear

    torch.manual_seed(5)
    ours, after_ours = Linear(48, 24, bias=True), torch.rand(3)
    torch.manual_seed(5)
    theirs, after_theirs = nn.Linear(48, 24, bias=True), torch.rand(3)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    assert torch.equal(after_ours, after_theirs)  # the generator left where nn.Linear leaves it

    def draw(*args, **kwargs):
        raise AssertionError("a random draw on the meta device")

    monkeypatch.setattr(nn.init, "kaiming_uniform_", draw)
    with torch.device("meta"):
        Linear(48, 24)
        DeepseekV3(tiny_config())
        with pytest.raises(AssertionError, match="random draw"):
            nn.Linear(48, 24)  # the control: torch's layer draws


def test_stored_copies_are_compared_slice_by_slice_in_the_models_dtype():
    # the loader checks the MTP module's stored copies of embedding and head against the main tensors a
    # slice of rows at a time, on the main tensor's device and in its dtype (GPU: tests/test_mtp.py)
    from dsv3ref.checkpoint import _equal_values

    g = torch.Generator().manual_seed(0)
    stored = torch.randn(10, 6, generator=g)
    main = stored.to(torch.bfloat16)
    assert _equal_values(stored.to(torch.bfloat16).float(), main, rows=3)  # equal after the dtype cast
    for row in (0, 4, 9):  # a difference in the first, a middle and the last, shorter slice
        changed = stored.to(torch.bfloat16).float()
        changed[row, 5] += 1
        assert not _equal_values(changed, main, rows=3), row
    assert not _equal_values(stored[:9], stored, rows=3)  # another shape
