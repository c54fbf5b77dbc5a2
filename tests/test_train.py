"""Training (dsv3ref.train): the loop learns, resumes exactly, balances its experts; FP8 training's
gradients equal float64 autograd of the same quantized computation."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import rel_err

from dsv3ref import DeepseekV3, generate
from dsv3ref.fp8 import dequantize_weight, quantize_activation, quantize_weight
from dsv3ref.routing import update_bias
from dsv3ref.train import Corpus, FP8LinearFunction, TrainConfig, learning_rate, max_violation, train
from dsv3ref.train.data import batch, decode, encode, is_validation, stdlib_files
from dsv3ref.train.loop import build_model, evaluate


@pytest.fixture(scope="module")
def corpus():
    return Corpus.stdlib(400_000)


def _tiny(**changes) -> dict:
    """A smaller model than the default, for tests (2 MoE layers of 8 experts)."""
    base = dict(hidden_size=64, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
                n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=32,
                kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    base.update(changes)
    return base


def test_the_corpus_is_the_standard_library_split_by_file(corpus):
    files = stdlib_files()
    assert len(files) > 200 and all(p.suffix == ".py" for p in files)
    assert corpus.files[0] > 0 and corpus.files[1] > 0
    assert corpus.train.dtype == torch.uint8 and corpus.validation.numel() > 10_000
    assert is_validation("json/decoder.py") == is_validation("json/decoder.py")  # a pure function of the path
    assert decode(encode("héllo")) == "héllo"
    assert torch.equal(batch(corpus.train, 2, 16, seed=1, step=5), batch(corpus.train, 2, 16, seed=1, step=5))


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4) and learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 55) == pytest.approx(0.55e-3)  # halfway down the cosine
    assert learning_rate(cfg, 100) == pytest.approx(1e-4)


def test_bias_update_follows_the_sign_rule():
    bias = torch.tensor([0.0, 0.5, -0.2, 0.1])
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5: expert 0 over, 1-3 under
    update_bias(bias, load, gamma=0.001)
    assert torch.allclose(bias, torch.tensor([-0.001, 0.501, -0.199, 0.101]))
    assert max_violation(torch.tensor([10.0, 2.0, 4.0, 4.0])) == pytest.approx(10 / 5 - 1)


def test_training_lowers_the_validation_loss_and_resumes_bit_for_bit(corpus, tmp_path):
    torch.set_num_threads(1)
    common = dict(steps=40, batch_size=8, seq_len=64, eval_every=20, eval_batches=2, warmup=5, save_every=20,
                  progress=False, model=_tiny())
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), **common), corpus=corpus)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    start = TrainConfig(out_dir=str(tmp_path / "x"), **common)
    untrained = evaluate(build_model(start), corpus.validation, start)
    assert full["val_loss"] < 0.7 * untrained["val_loss"], (full["val_loss"], untrained["val_loss"])  # 5.5 -> ~3
    # resume from the mid-run checkpoint: the same final weights, bit for bit
    resumed = train(TrainConfig(out_dir=str(tmp_path / "resumed"), **common), corpus=corpus,
                    resume=tmp_path / "full" / "step_000020")
    a = DeepseekV3.from_pretrained(tmp_path / "full" / "step_000040").state_dict()
    b = DeepseekV3.from_pretrained(tmp_path / "resumed" / "step_000040").state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed["val_loss"] == full["val_loss"] and len(rows) == 40


def test_the_bias_update_balances_the_experts_better_than_nothing(corpus, tmp_path):
    torch.set_num_threads(1)
    common = dict(steps=60, batch_size=8, seq_len=64, eval_every=60, eval_batches=2, warmup=5, progress=False,
                  model=_tiny(), gamma=0.01)
    bias = train(TrainConfig(out_dir=str(tmp_path / "b"), balance="bias", **common), corpus=corpus)
    none = train(TrainConfig(out_dir=str(tmp_path / "n"), balance="none", **common), corpus=corpus)
    assert bias["val_maxvio"] < none["val_maxvio"], (bias["val_maxvio"], none["val_maxvio"])


def test_fp8_gradients_equal_float64_autograd_of_the_same_quantized_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 300, generator=g, requires_grad=True)  # K = 300: a partial 128-block at the edge
    w = (torch.randn(260, 300, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(200, 260, generator=g)
    y = FP8LinearFunction.apply(x, w)
    y.backward(dy)
    # the oracle: each operand quantized as the report says, dequantized into float64, then plain float64
    # matmuls differentiated by autograd, with the quantized output gradient fed in
    w_q, w_s = quantize_weight(w.detach())
    w64 = dequantize_weight(w_q, w_s, dtype=torch.float64)

    def deq_tiles(t):  # 1 x 128 tiles along the last dim
        q, s = quantize_activation(t)
        return (q.double().reshape(t.shape[0], -1) * torch.repeat_interleave(s.double(), 128, dim=1)[:, :t.shape[1]])

    x_tiles = deq_tiles(x.detach()).requires_grad_()
    y64 = x_tiles @ w64.T
    assert rel_err(y, y64) < 1e-6  # Fprop: x in 1x128 tiles, W in 128x128 blocks
    w64_leaf = w64.clone().requires_grad_()
    (dx64,) = torch.autograd.grad(x_tiles @ w64_leaf.T, x_tiles, deq_tiles(dy))  # Dgrad: dy in 1x128 tiles
    assert rel_err(x.grad, dx64) < 1e-6
    x_cols = deq_tiles(x.detach().T.contiguous()).T.requires_grad_(False)  # x in 128x1 tiles (along tokens)
    dy_cols = deq_tiles(dy.T.contiguous()).T  # dy in 128x1 tiles
    (dw64,) = torch.autograd.grad(x_cols @ w64_leaf.T, w64_leaf, dy_cols)  # Wgrad
    assert rel_err(w.grad, dw64) < 1e-6
    # and the quantization is real: the plain float64 gradient differs by more than the tolerance
    assert rel_err(w.grad, dy.double().T @ x.detach().double()) > 1e-3


def test_a_short_fp8_run_stays_close_to_float32(corpus, tmp_path):
    torch.set_num_threads(1)
    common = dict(steps=20, batch_size=4, seq_len=64, eval_every=20, eval_batches=2, warmup=5, progress=False,
                  model=_tiny())
    f32 = train(TrainConfig(out_dir=str(tmp_path / "f"), **common), corpus=corpus)
    fp8 = train(TrainConfig(out_dir=str(tmp_path / "q"), fp8=True, **common), corpus=corpus)
    # 20 steps from the same start and batches: FP8's quantization error moves the loss by about 1%
    assert abs(fp8["val_loss"] - f32["val_loss"]) / f32["val_loss"] < 0.03, (fp8["val_loss"], f32["val_loss"])


def test_trained_mtp_drafts_are_accepted_far_more_than_untrained_ones(corpus, tmp_path):
    torch.set_num_threads(1)
    cfg = TrainConfig(out_dir=str(tmp_path / "m"), steps=80, batch_size=8, seq_len=64, eval_every=80, eval_batches=1,
                      warmup=5, progress=False, model=_tiny())
    train(cfg, corpus=corpus)
    trained = DeepseekV3.from_pretrained(tmp_path / "m" / "step_000080")
    rates = {}
    for label, model in (("trained", trained), ("untrained", DeepseekV3(trained.config).eval())):
        prompts = [batch(corpus.validation, 1, 32, seed=3, step=i)[0].tolist() for i in range(3)]
        plain = generate(model, prompts, 24, eos_token_id=[])
        spec = generate(model, prompts, 24, eos_token_id=[], speculative=True)
        assert spec.tokens == plain.tokens
        rates[label] = spec.stats["acceptance_rate"]
    assert rates["trained"] > rates["untrained"] + 0.2, rates
