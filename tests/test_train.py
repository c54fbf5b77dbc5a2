"""Training (dsv3ref.train): the loop learns, resumes exactly, balances its experts; FP8 training's
gradients equal float64 autograd of the same quantized computation."""

from __future__ import annotations

import json
import math
import sysconfig

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file

from dsv3ref import DeepseekV3, generate
from dsv3ref.fp8 import dequantize_weight, fp8_matmul, quantize_activation, quantize_weight, rows_of_blocks, tile_matmul
from dsv3ref.router import RoutingRecord
from dsv3ref.routing import capture, routers, update_bias
from dsv3ref.train import Corpus, FP8LinearFunction, TrainConfig, learning_rate, max_violation, train
from dsv3ref.train.data import batch, decode, encode, is_validation, stdlib_files
from dsv3ref.train.fp8 import fp8_training_layers
from dsv3ref.train.loop import balance_loss, build_model, evaluate


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
    # one file in VALIDATION_EVERY = 20 goes to validation, decided by its path: about 5% of the files
    names = [p.relative_to(sysconfig.get_paths()["stdlib"]).as_posix() for p in files]
    share = sum(map(is_validation, names)) / len(names)
    assert 0.03 < share < 0.07, share
    assert decode(encode("héllo")) == "héllo"
    rows = batch(corpus.train, 4, 16, seed=1, step=5)
    data = bytes(corpus.train.tolist())
    assert rows.dtype == torch.int64 and all(bytes(r.tolist()) in data for r in rows)  # windows of the corpus
    assert not torch.equal(rows, batch(corpus.train, 4, 16, seed=1, step=6))  # each step its own windows


def test_schedule_warms_up_linearly_peaks_once_and_decays_by_the_cosine_to_min_lr():
    cfg = TrainConfig(steps=12, warmup=4, lr=1.0, min_lr=0.1)
    # written out: (s + 1) / warmup during warmup, then min + (lr - min) / 2 * (1 + cos(pi * (s - 4) / 8))
    expected = [0.25, 0.5, 0.75, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * (s - 4) / 8)) for s in range(4, 13)]
    got = [learning_rate(cfg, s) for s in range(13)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert max(got) == 1.0 and got[3] == got[4] == 1.0  # the peak is lr, at the warmup boundary, never above
    assert got[8] == pytest.approx(0.55) and got[12] == pytest.approx(0.1)


def test_bias_update_follows_the_sign_rule():
    bias = torch.tensor([0.0, 0.5, -0.2, 0.1])
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5: expert 0 over, 1-3 under
    update_bias(bias, load, gamma=0.001)
    assert torch.allclose(bias, torch.tensor([-0.001, 0.501, -0.199, 0.101]))
    assert max_violation(torch.tensor([10.0, 2.0, 4.0, 4.0])) == pytest.approx(10 / 5 - 1)


def test_training_lowers_the_validation_loss(corpus, tmp_path):
    torch.set_num_threads(1)
    common = dict(steps=40, batch_size=8, seq_len=64, eval_every=20, eval_batches=2, warmup=5, progress=False,
                  model=_tiny())
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), **common), corpus=corpus)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    start = TrainConfig(out_dir=str(tmp_path / "x"), **common)
    untrained = evaluate(build_model(start), corpus.validation, start)
    assert full["val_loss"] < 0.7 * untrained["val_loss"], (full["val_loss"], untrained["val_loss"])  # 5.5 -> ~3
    assert [r["step"] for r in rows] == list(range(1, 41))


def _run(tmp_path, name: str, **changes) -> TrainConfig:
    """A run of the small test model; its defaults: 8 x 32 tokens, warmup 5, no evaluation until the end."""
    settings = dict(out_dir=str(tmp_path / name), steps=1, batch_size=8, seq_len=32, eval_every=1000, eval_batches=1,
                    warmup=5, progress=False, model=_tiny())
    settings.update(changes)
    return TrainConfig(**settings)


def _adamw_step(model: DeepseekV3, ids: torch.Tensor, cfg: TrainConfig, step: int, moments: dict | None = None,
                adam_steps: dict | None = None) -> tuple[dict, float]:
    """One step of the loop written out from its definition, in float64 after the gradient:
    loss = L_main + lambda / D * sum_k L^k (eqs. 24-25); the gradient clipped to total norm grad_clip
    (coefficient clip / (norm + 1e-6), at most 1); AdamW (betas 0.9, 0.95, eps 1e-8) with decoupled
    weight decay on every weight but the RMSNorm gains; the learning rate of `step` in the warmup.
    Returns (name -> (new parameter, exp_avg, exp_avg_sq) for the parameters that get a gradient,
    the clip coefficient)."""
    assert step < cfg.warmup  # the written-out learning rate below is the warmup's
    lr = cfg.lr * (step + 1) / cfg.warmup
    params = dict(model.named_parameters())
    out = model.loss(ids, 0.0)  # lambda 0: the main loss and the per-depth losses, nothing mixed
    total = out["main"] + cfg.mtp_lambda / len(out["mtp_per_depth"]) * out["mtp_per_depth"].sum()
    grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    grads = {n: g.double() for n, g in zip(params, grads, strict=True) if g is not None}
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    coef = min(1.0, cfg.grad_clip / (norm + 1e-6))
    moments, adam_steps = moments or {}, adam_steps or {}
    new = {}
    for name, g in grads.items():
        g = g * coef
        t = adam_steps.get(name, 0) + 1
        m = 0.9 * moments.get(f"{name}.exp_avg", torch.zeros_like(g)).double() + 0.1 * g
        v = 0.95 * moments.get(f"{name}.exp_avg_sq", torch.zeros_like(g)).double() + 0.05 * g * g
        decay = 0.0 if name.endswith("norm.weight") else cfg.weight_decay
        p = params[name].detach().double() * (1 - lr * decay) - lr * (m / (1 - 0.9**t)) / (
            (v / (1 - 0.95**t)).sqrt() + 1e-8)
        new[name] = (p, m, v)
    return new, coef


def _assert_step_equal(folder, expected: dict, lr: float) -> None:
    """The loop's checkpoint equals the written-out step: parameters within float32 rounding of the
    update (1e-6 of it, plus 1e-6 of the weight), moments within 1e-5 of their largest value."""
    weights, moments = load_file(folder / "model.safetensors"), load_file(folder / "optimizer.safetensors")
    assert {k.rsplit(".", 1)[0] for k in moments} == set(expected)
    for name, (p, m, v) in expected.items():
        assert (weights[name].double() - p).abs().max() <= 1e-6 * lr + 1e-6 * p.abs().max(), name
        for got, want in ((moments[f"{name}.exp_avg"], m), (moments[f"{name}.exp_avg_sq"], v)):
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max() + 1e-30, name


def test_the_first_step_is_clipped_adamw_on_main_plus_lambda_over_d_mtp(corpus, tmp_path):
    torch.set_num_threads(1)
    cfg = _run(tmp_path, "one", grad_clip=1e-3, mtp_lambda=0.3, weight_decay=0.1, lr=1e-2)
    expected, coef = _adamw_step(build_model(cfg), batch(corpus.train, 8, 32, cfg.seed, 0), cfg, step=0)
    assert coef < 0.01  # the clip really acts (the gradient's norm is about 3)
    train(cfg, corpus=corpus)
    _assert_step_equal(tmp_path / "one" / "step_000001", expected, lr=cfg.lr / cfg.warmup)


def test_a_resumed_step_is_adamw_continued_from_the_saved_moments(corpus, tmp_path):
    torch.set_num_threads(1)
    cfg = _run(tmp_path, "run", steps=3, save_every=2, grad_clip=0.5)
    train(cfg, corpus=corpus)
    saved = tmp_path / "run" / "step_000002"
    state = json.loads((saved / "train_state.json").read_text())
    model = build_model(cfg)
    model.load_state_dict(DeepseekV3.from_pretrained(saved).state_dict())
    expected, _ = _adamw_step(model, batch(corpus.train, 8, 32, cfg.seed, 2), cfg, step=2,
                              moments=load_file(saved / "optimizer.safetensors"), adam_steps=state["adam_steps"])
    # the uninterrupted run's third step, and the same step resumed in another folder, are that step
    _assert_step_equal(tmp_path / "run" / "step_000003", expected, lr=cfg.lr * 3 / cfg.warmup)
    train(_run(tmp_path, "resumed", steps=3, save_every=2, grad_clip=0.5), resume=saved, corpus=corpus)
    _assert_step_equal(tmp_path / "resumed" / "step_000003", expected, lr=cfg.lr * 3 / cfg.warmup)


def test_a_run_with_absorbed_attention_follows_the_readable_run(corpus, tmp_path):
    """attn_impl="absorb" (torch's fused attention kernel for each training chunk) trains the run the
    readable attention trains: in float64, three steps give the same losses and weights to a relative
    error of 1e-9 (the two differ in the order of sums: 1e-13 after the three steps, measured). A run resumed with the
    other attention is refused, as any change of a trajectory's setting is."""
    torch.set_num_threads(1)
    runs = {impl: _run(tmp_path, impl, steps=3, save_every=3, dtype="float64", attn_impl=impl)
            for impl in ("naive", "absorb")}
    finals = {impl: train(cfg, corpus=corpus) for impl, cfg in runs.items()}
    assert math.isclose(finals["absorb"]["loss"], finals["naive"]["loss"], rel_tol=1e-9)
    weights = {impl: load_file(tmp_path / impl / "step_000003" / "model.safetensors") for impl in runs}
    assert weights["absorb"].keys() == weights["naive"].keys()
    for name, want in weights["naive"].items():
        assert rel_err(weights["absorb"][name], want) < 1e-9, name
    with pytest.raises(ValueError, match="resume: attn_impl was 'absorb'"):
        train(_run(tmp_path, "switched", steps=4, dtype="float64", attn_impl="naive"),
              resume=tmp_path / "absorb" / "step_000003", corpus=corpus, allow_changes=("steps",))
    with pytest.raises(ValueError, match="attn_impl: found 'fused'"):
        TrainConfig(attn_impl="fused")
    with pytest.raises(ValueError, match="attn_impl: found 'absorb' with fp8=True"):
        TrainConfig(attn_impl="absorb", fp8=True)


def test_the_late_mtp_weight_starts_at_its_switch_step(corpus, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    used = []
    real = DeepseekV3.loss

    def recording(self, ids, mtp_lambda=0.3):
        if self.training:
            used.append(mtp_lambda)
        return real(self, ids, mtp_lambda)
    monkeypatch.setattr(DeepseekV3, "loss", recording)
    train(_run(tmp_path, "late", steps=25, batch_size=1, seq_len=8, mtp_lambda=0.3, mtp_lambda_late=0.1,
               mtp_switch=0.68), corpus=corpus)
    assert used == [0.3] * 17 + [0.1] * 8  # step s (0-based) is late from s >= 0.68 * 25 = 17


def test_the_bias_stops_moving_at_gamma_switch(corpus, tmp_path, monkeypatch):
    """The report's gamma schedule: 0.001, then 0 for the last 500B of 14.8T tokens (gamma_switch 0.966)."""
    import dsv3ref.train.loop as loop
    torch.set_num_threads(1)
    speeds = []
    real = loop.update_bias

    def recording(bias, load, gamma):
        speeds.append(gamma)
        return real(bias, load, gamma)
    monkeypatch.setattr(loop, "update_bias", recording)
    cfg = _run(tmp_path, "gamma", steps=30, batch_size=1, seq_len=8, gamma=0.001, gamma_late=0.0, gamma_switch=0.966,
               save_every=29)
    train(cfg, corpus=corpus)
    per_step = len(speeds) // 30  # one call per router per step
    # step s (0-based) is late from s >= 0.966 * 30 = 28.98, i.e. only the last step
    assert speeds == [0.001] * (29 * per_step) + [0.0] * per_step
    before, after = (routers(DeepseekV3.from_pretrained(tmp_path / "gamma" / f"step_{s:06d}")) for s in (29, 30))
    for layer, router in before.items():  # moved until step 29, frozen in step 30
        assert router.e_score_correction_bias.abs().max() > 0
        assert torch.equal(router.e_score_correction_bias, after[layer].e_score_correction_bias)


def test_the_classic_auxiliary_loss_by_hand():
    g = torch.Generator().manual_seed(1)
    t, e, k, alpha = 12, 6, 2, 0.1
    scores = torch.rand(t, e, generator=g, dtype=torch.float64)
    ids = scores.topk(k, dim=-1).indices
    record = RoutingRecord(scores=scores, groups=torch.zeros(t, 1, dtype=torch.long), ids=ids,
                           weights=torch.ones(t, k, dtype=torch.float64),
                           counts=torch.bincount(ids.flatten(), minlength=e))
    expected = 0.0
    for i in range(e):  # alpha * sum_i f_i P_i: f_i = E / (K T) * tokens choosing i, P_i = mean_t s_i,t / sum_j s_j,t
        f = e / (k * t) * sum(int(i in ids[row].tolist()) for row in range(t))
        p = sum(float(scores[row, i] / scores[row].sum()) for row in range(t)) / t
        expected += alpha * f * p
    got = balance_loss({1: [record]}, TrainConfig(balance="aux", aux_alpha=alpha), batch_size=1)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_each_step_moves_every_router_bias_by_gamma_against_its_load(corpus, tmp_path):
    torch.set_num_threads(1)
    cfg = _run(tmp_path, "b", gamma=0.01, balance="bias")
    model = build_model(cfg)
    with capture(model) as records, torch.no_grad():
        model.loss(batch(corpus.train, 8, 32, cfg.seed, 0), cfg.mtp_lambda)
    train(cfg, corpus=corpus)
    after = DeepseekV3.from_pretrained(tmp_path / "b" / "step_000001")
    for layer, router in routers(after).items():
        n = router.e_score_correction_bias.numel()
        load = sum(torch.bincount(r.ids.flatten(), minlength=n) for r in records[layer]).double()
        expected = 0.01 * torch.sign(load.mean() - load)  # the bias starts at zero
        assert torch.equal(router.e_score_correction_bias, expected.float()), layer
    train(_run(tmp_path, "n", balance="none"), corpus=corpus)
    assert not any(r.e_score_correction_bias.any() for r in routers(DeepseekV3.from_pretrained(
        tmp_path / "n" / "step_000001")).values())


@pytest.mark.parametrize("kernel", ["emulate", "dequantize"])
def test_fp8_gradients_equal_float64_autograd_of_the_same_quantized_computation(kernel):
    """Either kernel, float32 layer: its three GEMMs within float32 rounding (1e-6) of float64 GEMMs on the
    same quantized operands, the operands being the report's (and no other: the last two checks)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 300, generator=g, requires_grad=True)  # K = 300: a partial 128-block at the edge
    w = (torch.randn(260, 300, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(200, 260, generator=g)
    y = FP8LinearFunction.apply(x, w, None, None, kernel)
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
    # Wgrad: x as the forward stored it (1x128 FP8 tiles), dequantized, transposed and quantized again in
    # 128x1 tiles (along tokens), as the report's section 3.5.2 describes; dy in 128x1 tiles
    x_cols = deq_tiles(deq_tiles(x.detach()).float().T.contiguous()).T
    dy_cols = deq_tiles(dy.T.contiguous()).T
    (dw64,) = torch.autograd.grad(x_cols @ w64_leaf.T, w64_leaf, dy_cols)
    assert rel_err(w.grad, dw64) < 1e-6
    # quantizing x in 128x1 tiles from its high-precision value instead (what dsv3ref did before
    # 2026-12-03) rounds differently: by far more than the tolerance
    x_cols_direct = deq_tiles(x.detach().T.contiguous()).T
    (dw64_direct,) = torch.autograd.grad(x_cols_direct @ w64_leaf.T, w64_leaf, dy_cols)
    assert rel_err(w.grad, dw64_direct) > 1e-4
    # and the quantization is real: the plain float64 gradient differs by more than the tolerance
    assert rel_err(w.grad, dy.double().T @ x.detach().double()) > 1e-3


@pytest.mark.parametrize("m,k,n", [(200, 300, 260), (130, 64, 128), (5, 128, 7)])
def test_fp8_gemms_are_the_recipe_written_out_bit_for_bit(m, k, n):
    """Fprop, Dgrad and Wgrad of FP8LinearFunction give the bits of the report's recipe composed from the
    GEMM (tile_matmul, itself held to the block recipe written out in test_fp8) and the quantizers:
    Dgrad with dy in 1 x 128 tiles against the weight's blocks transposed; Wgrad with dy and the forward's
    FP8 activation, dequantized, each transposed into a copy and quantized in 1 x 128 tiles there (the
    128 x 1 tiles of the untransposed tensors, which the layer quantizes in place)."""
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g, requires_grad=True)
    w = (torch.randn(n, k, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(m, n, generator=g)
    y = FP8LinearFunction.apply(x, w)
    y.backward(dy)
    x_q, x_s = quantize_activation(x.detach())
    w_q, w_s = quantize_weight(w.detach())
    assert torch.equal(y.view(torch.int32), fp8_matmul(x_q, x_s, w_q, w_s).view(torch.int32))
    dy_q, dy_s = quantize_activation(dy)
    dx = tile_matmul(dy_q, dy_s, w_q.T.contiguous(), rows_of_blocks(w_s.T.contiguous(), k))
    assert torch.equal(x.grad.view(torch.int32), dx.view(torch.int32))
    x_deq = x_q.float() * x_s.repeat_interleave(128, dim=1)[:, :k]  # the forward's FP8 copy, dequantized
    dw = tile_matmul(*quantize_activation(dy.T.contiguous()), *quantize_activation(x_deq.T.contiguous()))
    assert torch.equal(w.grad.view(torch.int32), dw.view(torch.int32))


def test_the_dequantize_kernel_trains_as_the_emulation_does_to_rounding():
    """fp8_kernel "dequantize" against "emulate": the same quantized operands, other GEMM arithmetic. One
    layer in float32: Fprop, Dgrad and Wgrad apart by float32 rounding (measured 2-4e-7; bound 1e-6), and
    not the same bits (another path really ran). A whole model's loss and gradients in float64: apart by
    float64 rounding (measured 7e-16; bound 1e-12). (A whole float32 model is no test of the GEMMs: a
    last-bit difference tips an activation to the neighbouring E4M3 value or a token to another expert.)"""
    from dsv3ref.train.loop import small_config
    g = torch.Generator().manual_seed(5)
    x = torch.randn(130, 300, generator=g)
    w = torch.randn(200, 300, generator=g) * 0.05
    dy = torch.randn(130, 200, generator=g)
    got = {}
    for kernel in ("emulate", "dequantize"):
        xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = FP8LinearFunction.apply(xk, wk, None, None, kernel)
        y.backward(dy)
        got[kernel] = (y.detach(), xk.grad, wk.grad)
    for exact, fast in zip(got["emulate"], got["dequantize"], strict=True):
        assert 0 < rel_err(fast, exact) < 1e-6
    cfg = small_config(**_tiny())
    ids = torch.randint(0, 256, (2, 33), generator=g)
    models = {}
    for kernel in ("emulate", "dequantize"):
        torch.manual_seed(0)
        model = DeepseekV3(cfg)
        fp8_training_layers(model, kernel)
        model = model.double()
        loss = model.loss(ids)["loss"]
        loss.backward()
        models[kernel] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (loss_e, grads_e), (loss_d, grads_d) = models["emulate"], models["dequantize"]
    assert abs(loss_d - loss_e) <= 1e-12 * loss_e and grads_e.keys() == grads_d.keys()
    for name, grad in grads_e.items():
        assert rel_err(grads_d[name], grad) < 1e-12, name


def test_fp8_kernel_is_checked_where_training_is_configured():
    from dsv3ref.cli import main
    with pytest.raises(ValueError, match="fp8_kernel: found 'scaled_mm', FP8 training runs one of "
                                         r"\('emulate', 'dequantize'\)"):
        TrainConfig(fp8=True, fp8_kernel="scaled_mm")
    with pytest.raises(ValueError, match="fp8_kernel: found 'fast', expected one of"):
        TrainConfig(fp8=True, fp8_kernel="fast")
    with pytest.raises(ValueError, match="fp8_kernel='dequantize' chooses how FP8 GEMMs multiply: it needs fp8=True"):
        TrainConfig(fp8_kernel="dequantize")
    with pytest.raises(ValueError, match="fp8_kernel: found 'dequantise', expected one of"):
        FP8LinearFunction.apply(torch.ones(2, 3), torch.ones(4, 3), None, None, "dequantise")
    with pytest.raises(SystemExit):
        main(["train", "--fp8", "--fp8-kernel", "scaled_mm"])  # argparse: not a choice of train


def test_an_activation_read_by_two_fp8_layers_is_quantized_once(monkeypatch):
    """An MLP's gate_proj and up_proj read the same x: its 1 x 128 tiles (forward) and its 128 x 1 tiles
    (Wgrad) are made once for both, and dropped after the last backward pass that reads them; the
    gradients are bit for bit those of every layer quantizing x on its own. A change of x in place
    quantizes it again."""
    from dsv3ref import train as train_package
    from dsv3ref.mlp import MLP
    from dsv3ref.train import FP8TrainLinear
    from dsv3ref.train.fp8 import activation_tiles

    g = torch.Generator().manual_seed(3)
    mlp = MLP(300, 200)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, FP8TrainLinear(torch.randn(getattr(mlp, name).weight.shape, generator=g) * 0.05))
    x = torch.randn(2, 100, 300, generator=g, requires_grad=True)
    dy = torch.randn(2, 100, 300, generator=g)
    calls = {"quantize_activation": [], "quantize_columns": []}
    for name, shapes in calls.items():
        real = getattr(train_package.fp8, name)
        monkeypatch.setattr(train_package.fp8, name, lambda t, real=real, shapes=shapes: shapes.append(
            tuple(t.shape)) or real(t))
    mlp(x).backward(dy)
    # 1 x 128 tiles: x (200, 300) once for gate_proj and up_proj, the hidden h (200, 200) once, and each
    # layer's dy: down_proj's (200, 300), gate_proj's and up_proj's (200, 200)
    assert sorted(calls["quantize_activation"]) == [(200, 200)] * 3 + [(200, 300)] * 2
    # 128 x 1 tiles: the same three dy, x once, h
    assert sorted(calls["quantize_columns"]) == [(200, 200)] * 3 + [(200, 300)] * 2
    tiles = activation_tiles(x)  # the tiles the forward made (kept with x), not new ones
    assert tiles.readers == 0 and tiles._columns is None  # Wgrad's copy dropped after both layers' backward

    def unshared(layer, inp):  # each layer quantizing its own input
        return FP8LinearFunction.apply(inp.reshape(-1, inp.shape[-1]), layer.weight).view(*inp.shape[:-1], -1)

    x2 = x.detach().clone().requires_grad_()
    weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    grads = [p.grad.clone() for p in weights]
    for p in weights:
        p.grad = None
    h = torch.nn.functional.silu(unshared(mlp.gate_proj, x2)) * unshared(mlp.up_proj, x2)
    unshared(mlp.down_proj, h).backward(dy)
    for got, p in zip(grads, weights, strict=True):
        assert torch.equal(got.view(torch.int32), p.grad.view(torch.int32))
    assert torch.equal(x.grad.view(torch.int32), x2.grad.view(torch.int32))
    calls["quantize_activation"].clear()
    with torch.no_grad():
        x3 = x.detach().clone()
        mlp.gate_proj(x3)
        x3.mul_(2)  # in place: up_proj must not read the tiles of the old value
        assert torch.equal(mlp.up_proj(x3), unshared(mlp.up_proj, x3))
    assert calls["quantize_activation"] == [(200, 300)] * 3  # before, after the change, and the oracle's


def test_an_fp8_layer_quantizes_its_weight_once_per_value_it_takes():
    """Micro-batches of one step share the E4M3 blocks; an optimizer step (in place) or a new weight
    quantizes again; the gradients of two micro-batches equal those of each alone, summed."""
    from dsv3ref.train import FP8TrainLinear
    g = torch.Generator().manual_seed(1)
    layer = FP8TrainLinear(torch.randn(256, 384, generator=g) * 0.05)
    xs = [torch.randn(64, 384, generator=g) for _ in range(2)]
    for x in xs:
        layer(x).square().sum().backward()
    assert layer.quantizations == 1
    summed = layer.weight.grad.clone()
    alone = []
    for x in xs:
        layer.weight.grad = None
        layer(x).square().sum().backward()
        alone.append(layer.weight.grad)
    assert torch.equal(summed, alone[0] + alone[1]) and layer.quantizations == 1
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    layer(xs[0])
    assert layer.quantizations == 2
    with torch.no_grad():
        layer.weight = torch.nn.Parameter(layer.weight * 2)
    assert torch.equal(layer(xs[0]), FP8LinearFunction.apply(xs[0], layer.weight)) and layer.quantizations == 3


@pytest.mark.parametrize("kernel", ["emulate", "dequantize"])
def test_micro_batches_share_the_weights_gemm_form(kernel, monkeypatch):
    """The weight's form for the GEMMs (decoded to float64, or dequantized) is made once per E4M3 blocks,
    so once per optimizer step however many micro-batches run, and again after the step."""
    from dsv3ref import train as train_package
    from dsv3ref.train import FP8TrainLinear
    made = []
    name = "dequantize_weight_fast" if kernel == "dequantize" else "decode_e4m3"
    real = getattr(train_package.fp8, name)
    monkeypatch.setattr(train_package.fp8, name, lambda q, *a, **k: made.append(tuple(q.shape)) or real(q, *a, **k))
    g = torch.Generator().manual_seed(2)
    layer = FP8TrainLinear(torch.randn(256, 384, generator=g) * 0.05, kernel)
    xs = [torch.randn(64, 384, generator=g) for _ in range(3)]
    for x in xs:
        layer(x).square().sum().backward()
    assert made.count((256, 384)) == 1
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    layer(xs[0])
    assert made.count((256, 384)) == 2


def test_a_short_fp8_run_stays_close_to_float32(corpus, tmp_path):
    """Bounds from what E4M3 allows, measured over seeds 0-3: each operand rounded to 3 mantissa bits
    (relative error up to 2^-4 an element, averaging out over 64-128 products) moves the first step's
    loss by at most 2.2e-4 (bound 1e-3) and its gradient norm by at most 0.4% (bound 1e-2); 20 steps
    later the validation loss differs by 0.04% at seed 0 and at most 0.74% over seeds 0-2 (bound 1%),
    where another seed alone moves it by 0.6-3%."""
    torch.set_num_threads(1)
    common = dict(steps=20, batch_size=4, seq_len=64, eval_every=20, eval_batches=2, warmup=5, progress=False,
                  model=_tiny())
    f32 = train(TrainConfig(out_dir=str(tmp_path / "f"), **common), corpus=corpus)
    fp8 = train(TrainConfig(out_dir=str(tmp_path / "q"), fp8=True, **common), corpus=corpus)
    first = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("f", "q")]
    assert abs(first[1]["loss"] - first[0]["loss"]) / first[0]["loss"] < 1e-3, first
    assert abs(first[1]["grad_norm"] - first[0]["grad_norm"]) / first[0]["grad_norm"] < 1e-2, first
    assert first[1]["loss"] != first[0]["loss"]  # FP8 really ran
    assert abs(fp8["val_loss"] - f32["val_loss"]) / f32["val_loss"] < 0.01, (fp8["val_loss"], f32["val_loss"])


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
