"""Multi-Token Prediction: the module against its equations, the loss, and checkpoints.

Tolerances: float32 MTP outputs against the direct float32 computation below 1e-5 relative (same
operations, different grouping).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import direct_mtp, mtp_config, random_dsv3ref, rel_err
from safetensors.torch import load_file, save_file

import dsv3ref
from dsv3ref import DeepseekV3, generate


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_forward_matches_its_equations_embedding_first(depth):
    cfg = mtp_config(depth=depth)
    model = random_dsv3ref(cfg, seed=30)
    ids = torch.randint(0, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        h = model.hidden_states(ids)  # h^0 after the final norm
        for k in range(1, depth + 1):
            n = 14 - k
            expected_h, expected_logits = direct_mtp(model, k, h[:, :n - 0], ids[:, k:k + n])
            got = model.mtp_hidden_states(k, h[:, :n], ids[:, k:k + n])
            assert rel_err(got, expected_h) < 1e-5
            assert rel_err(model.mtp_logits(k, got), expected_logits) < 1e-5
            h = got
        # the other order (hidden first, as eq. 21 is printed) is a different function
        layer = model.mtp_layers[0]
        x = torch.randn(1, 3, cfg.hidden_size)
        e = torch.randn(1, 3, cfg.hidden_size)
        swapped = layer.eh_proj(torch.cat([layer.hnorm(x), layer.enorm(e)], -1))
        assert rel_err(layer.combine(x, e), swapped) > 1e-2


def test_mtp_loss_is_the_weighted_mean_of_per_depth_cross_entropies():
    cfg = mtp_config(depth=2)
    model = random_dsv3ref(cfg, seed=31)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model.loss(ids, mtp_lambda=0.3)
    with torch.no_grad():
        h0 = model.hidden_states(ids)
        main = F.cross_entropy(model.lm_head(h0[:, :-1]).reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        h1, l1 = direct_mtp(model, 1, h0[:, :10], ids[:, 1:11])  # predicts t_{i+2}, i = 0..9
        ce1 = F.cross_entropy(l1.reshape(-1, cfg.vocab_size), ids[:, 2:12].reshape(-1))
        _, l2 = direct_mtp(model, 2, h1[:, :9], ids[:, 2:11])  # predicts t_{i+3}, i = 0..8
        ce2 = F.cross_entropy(l2.reshape(-1, cfg.vocab_size), ids[:, 3:12].reshape(-1))
    assert out["main"].item() == pytest.approx(main.item(), rel=1e-5)
    assert out["mtp_per_depth"].tolist() == pytest.approx([ce1.item(), ce2.item()], rel=1e-5)
    assert out["mtp"].item() == pytest.approx(0.3 / 2 * (ce1.item() + ce2.item()), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["main"].item() + out["mtp"].item(), rel=1e-6)
    out["loss"].backward()  # trainable end to end
    assert model.mtp_layers[1].eh_proj.weight.grad.abs().sum() > 0


def test_checkpoint_with_mtp_reloads_with_identical_mtp_logits(tmp_path):
    cfg = mtp_config()
    model = random_dsv3ref(cfg, seed=32)
    dsv3ref.save_pretrained(model, tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    n = cfg.num_hidden_layers
    for suffix in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "self_attn.kv_b_proj.weight", "mlp.gate.e_score_correction_bias"]:
        assert f"model.layers.{n}.{suffix}" in names
    again = DeepseekV3.from_pretrained(tmp_path, moe_impl="grouped", attn_impl="absorb")
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        h = model.hidden_states(ids)
        a = model.mtp_logits(1, model.mtp_hidden_states(1, h[:, :-1], ids[:, 1:]))
        h2 = again.hidden_states(ids)
        b = again.mtp_logits(1, again.mtp_hidden_states(1, h2[:, :-1], ids[:, 1:]))
    assert rel_err(b, a) < 1e-5
    plain = DeepseekV3.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(plain.mtp_logits(1, plain.mtp_hidden_states(1, h[:, :-1], ids[:, 1:])), a)


def test_checkpoint_without_mtp_loads_with_mtp_off(tmp_path):
    cfg = mtp_config()
    model = random_dsv3ref(cfg, seed=33)
    dsv3ref.save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not k.startswith("model.layers.3.")}  # drop the MTP module
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = DeepseekV3.from_pretrained(tmp_path)
    assert len(loaded.mtp_layers) == 0 and loaded.config.num_nextn_predict_layers == 0
    assert "MTP is off" in loaded.load_notes[0]
    with pytest.raises(ValueError, match="no MTP modules"):
        generate(loaded, [[1, 2]], 3, speculative=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the loader reads on the CPU, places on CUDA")
def test_cuda_load_of_an_mtp_checkpoint_equals_the_cpu_load(tmp_path):
    # the MTP module's stored copies of the embedding and head are compared with the main ones where the
    # model lives (a CPU tensor against a CUDA one failed inside torch.equal before; gpu_checks step 5)
    cfg = mtp_config()
    dsv3ref.save_pretrained(random_dsv3ref(cfg, seed=34), tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    cpu, gpu = DeepseekV3.from_pretrained(tmp_path), DeepseekV3.from_pretrained(tmp_path, device="cuda")
    with torch.no_grad():
        h_cpu, h_gpu = cpu.hidden_states(ids), gpu.hidden_states(ids.cuda())
        assert rel_err(gpu.lm_head(h_gpu).cpu(), cpu.lm_head(h_cpu)) < 1e-5  # float32 on two devices
        mtp_cpu = cpu.mtp_logits(1, cpu.mtp_hidden_states(1, h_cpu[:, :-1], ids[:, 1:]))
        mtp_gpu = gpu.mtp_logits(1, gpu.mtp_hidden_states(1, h_gpu[:, :-1], ids[:, 1:].cuda()))
        assert rel_err(mtp_gpu.cpu(), mtp_cpu) < 1e-5
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.3.shared_head.head.weight"][-1, -1] += 1  # one value, in the last slice compared
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(dsv3ref.CheckpointError, match="shared_head.head.weight differs from lm_head"):
        DeepseekV3.from_pretrained(tmp_path, device="cuda")


def test_mtp_copy_of_the_head_must_equal_the_main_head(tmp_path):
    cfg = mtp_config()
    dsv3ref.save_pretrained(random_dsv3ref(cfg, seed=34), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.3.shared_head.head.weight"] += 1
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(dsv3ref.CheckpointError, match="model.layers.3.shared_head.head.weight differs from lm_head"):
        DeepseekV3.from_pretrained(tmp_path)
