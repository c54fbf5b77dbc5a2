"""The training loop: a small DeepSeek-V3 trained on bytes of the Python standard library.

One step (section 4 of the report, scaled down):

    loss = L_main + lambda * L_MTP (eqs. 24-25, model.loss)  [+ alpha * L_Bal or a classic aux loss]
    AdamW step on the clipped gradient, learning rate: linear warmup, then cosine to min_lr
    b_i <- b_i + gamma * sign(mean load - load_i)   for every router (auxiliary-loss-free balancing)

Balancing (`balance`): "bias" (the report's auxiliary-loss-free bias update, gamma = 0.001),
"aux" (a classic auxiliary loss alpha * E * sum_i f_i P_i over the batch, no bias) or "none".
`seq_alpha` adds the report's complementary sequence-wise loss (eqs. 17-20) to any of them.

Everything is seeded: the model's initialization, and each step's batch from (seed, step) alone, so a
run resumed from a checkpoint continues exactly as the uninterrupted run (on the same machine and
thread count). Checkpoints are folders `step_NNNNNN/` in the format `DeepseekV3.from_pretrained`
reads, plus `optimizer.safetensors` and `train_state.json`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3ref.config import ModelConfig
from dsv3ref.impl import check_choice
from dsv3ref.model import DeepseekV3
from dsv3ref.routing import DEFAULT_GAMMA, capture, routers, sequence_balance_loss, update_bias
from dsv3ref.train.checkpoint import load_checkpoint, save_checkpoint, step_folder
from dsv3ref.train.data import VOCAB_SIZE, Corpus, batch
from dsv3ref.train.fp8 import fp8_training_layers, training_kernel
from dsv3ref.train.run_folder import METRICS_FILE, MetricsLog, claim

BALANCE = ("bias", "aux", "none")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def small_config(**changes) -> ModelConfig:
    """The model trained here: byte vocabulary, 4 layers (1 dense + 3 MoE), 16 experts (top-4 of
    4 groups, 2 groups per token), one shared expert, one MTP module; about 0.9M parameters."""
    base = dict(vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                v_head_dim=32, intermediate_size=384, moe_intermediate_size=64, n_routed_experts=16,
                n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                rope_scaling=None, max_position_embeddings=1024, num_nextn_predict_layers=1,
                quantization_config=None, initializer_range=0.02, bos_token_id=None, eos_token_id=None)
    base.update(changes)
    return ModelConfig(**base)


@dataclass
class TrainConfig:
    """What a run does (`python -m dsv3ref train --help` lists the same fields)."""

    out_dir: str = "runs/train"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    """Weight of the MTP loss (report: 0.3 for the first 10T tokens, then 0.1)."""
    mtp_lambda_late: float | None = None
    """The MTP weight after mtp_switch of the steps (report: 0.1 after 10T of 14.8T tokens, i.e.
    mtp_switch = 0.68); None keeps mtp_lambda throughout."""
    mtp_switch: float = 0.68
    balance: str = "bias"
    gamma: float = DEFAULT_GAMMA
    """Bias update speed (report: 0.001 for the first 14.3T tokens, then 0)."""
    gamma_late: float | None = None
    """The bias update speed after gamma_switch of the steps (report: 0 for the last 500B of 14.8T tokens,
    i.e. gamma_switch = 0.966); None keeps gamma throughout."""
    gamma_switch: float = 0.966
    aux_alpha: float = 0.01
    """Weight of the classic auxiliary loss when balance="aux"."""
    seq_alpha: float = 0.0
    """Weight of the sequence-wise balance loss (report: 0.0001; 0 switches it off)."""
    fp8: bool = False
    """Train the FP8 layers' GEMMs in FP8 (dsv3ref.train.fp8)."""
    fp8_kernel: str = "emulate"
    """With fp8: how the FP8 GEMMs multiply (dsv3ref.impl's fp8_kernel): "emulate", the exact
    block-scaled recipe (the oracle), or "dequantize", the same E4M3 operands and scales multiplied in
    one float32 GEMM (float32 rounding apart, the same gradients, in about 1.8x the float32 step's time
    where "emulate" takes 2.6x: benchmarks/train_step.py)."""
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end)."""
    seed: int = 0
    max_corpus_bytes: int | None = 4_000_000
    model: dict = field(default_factory=dict)
    """Changes to small_config()."""
    progress: bool = True
    device: str = "cpu"
    """Where the model trains ("cuda" runs unchanged; batches are cut on the CPU and moved)."""
    dtype: str = "float32"
    """The weights' and activations' dtype: "float32", or "float64" (an oracle for other training code:
    the distributed trainer is checked against this loop in float64)."""
    attn_impl: str = "naive"
    """The attention's implementation (dsv3ref.impl): "naive", the readable one, or "absorb", which
    trains a chunk of as many queries as keys through torch's fused attention kernel, forward and
    backward (the same gradients to float rounding, tested; a faster step: benchmarks/train_step.py).
    Not with fp8."""

    def __post_init__(self) -> None:
        if self.balance not in BALANCE:
            raise ValueError(f"balance: found {self.balance!r}, expected one of {BALANCE}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup", "save_every"):
            _check_int(name, getattr(self, name), 0)
        _check_int("seed", self.seed, 0, 2**32)
        if self.max_corpus_bytes is not None:
            _check_int("max_corpus_bytes", self.max_corpus_bytes, 1)
        _check_number("lr", self.lr, low=0.0, open_low=True)
        _check_number("min_lr", self.min_lr, low=0.0, high=self.lr)
        _check_number("grad_clip", self.grad_clip, low=0.0, open_low=True)
        for name in ("weight_decay", "mtp_lambda", "gamma", "aux_alpha", "seq_alpha"):
            _check_number(name, getattr(self, name), low=0.0)
        if self.mtp_lambda_late is not None:
            _check_number("mtp_lambda_late", self.mtp_lambda_late, low=0.0)
        if self.gamma_late is not None:
            _check_number("gamma_late", self.gamma_late, low=0.0)
        for name in ("mtp_switch", "gamma_switch"):
            _check_number(name, getattr(self, name), low=0.0, high=1.0)
        for name in ("fp8", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected True or False, found {getattr(self, name)!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: expected a device such as 'cpu', 'cuda' or 'cuda:1', found {self.device!r}"
                             ) from None
        check_choice("attn_impl", self.attn_impl)
        training_kernel(self.fp8_kernel)
        if self.fp8_kernel != "emulate" and not self.fp8:
            raise ValueError(f"fp8_kernel={self.fp8_kernel!r} chooses how FP8 GEMMs multiply: it needs fp8=True")
        if self.fp8 and self.attn_impl != "naive":  # absorbed, kv_b_proj's weight would be read outside FP8
            raise ValueError(f"attn_impl: found {self.attn_impl!r} with fp8=True; FP8 training runs the "
                             "readable attention, expected 'naive'")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, found {self.dtype!r}")
        if not isinstance(self.model, dict):
            raise TypeError(f"model: expected a dict of changes to small_config(), found {type(self.model).__name__}")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """An integer in [low, high) (high None: no upper bound), else ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
        span = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name}: expected an integer {span}, found {value!r}")


def _check_number(name: str, value: object, low: float, high: float | None = None, open_low: bool = False) -> None:
    """A finite number >= low (> low if open_low) and <= high, else ValueError naming the field."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if open_low else value >= low) and (high is None or value <= high))
    if not ok:
        span = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ValueError(f"{name}: expected a finite number {span}, found {value!r}")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over cfg.warmup steps, then cosine from cfg.lr down to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def mtp_weight(cfg: TrainConfig, step: int) -> float:
    """lambda at `step` (0-based): mtp_lambda, then mtp_lambda_late from mtp_switch of the steps on."""
    late = cfg.mtp_lambda_late is not None and step >= cfg.mtp_switch * cfg.steps
    return cfg.mtp_lambda_late if late else cfg.mtp_lambda


def bias_speed(cfg: TrainConfig, step: int) -> float:
    """gamma at `step` (0-based): gamma, then gamma_late from gamma_switch of the steps on."""
    late = cfg.gamma_late is not None and step >= cfg.gamma_switch * cfg.steps
    return cfg.gamma_late if late else cfg.gamma


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean load - 1 (the loss-free balancing paper, arXiv 2408.15664)."""
    load = load.double()
    return float(load.max() / load.mean() - 1)


def balance_loss(records: dict, cfg: TrainConfig, batch_size: int) -> torch.Tensor:
    """The auxiliary losses of this step from the captured router scores (zero when switched off)."""
    total = torch.zeros(())
    for layer_records in records.values():
        for rec in layer_records:
            total = total.to(rec.scores.device)
            n, e = rec.scores.shape
            k = rec.ids.shape[1]
            if cfg.balance == "aux":  # classic (GShard/Switch-style) auxiliary loss over the whole batch
                f = torch.bincount(rec.ids.reshape(-1), minlength=e).to(rec.scores.dtype) * e / (k * n)
                p = (rec.scores / rec.scores.sum(-1, keepdim=True)).mean(0)
                total = total + cfg.aux_alpha * (f * p).sum()
            if cfg.seq_alpha:
                total = total + sequence_balance_loss(rec.scores.reshape(batch_size, -1, e),
                                                      rec.ids.reshape(batch_size, -1, k), alpha=cfg.seq_alpha)
    return total


@torch.no_grad()
def evaluate(model: DeepseekV3, data: torch.Tensor, cfg: TrainConfig) -> dict:
    """Validation: mean main and MTP losses over cfg.eval_batches fixed batches, and the routers'
    load balance on them (MaxVio per MoE layer, averaged)."""
    model.eval()
    losses, mtps, loads = [], [], {}
    with capture(model) as records:
        for i in range(cfg.eval_batches):
            ids = batch(data, cfg.batch_size, cfg.seq_len, seed=10_000 + cfg.seed, step=i).to(cfg.device)
            out = model.loss(ids, cfg.mtp_lambda)
            losses.append(float(out["main"]))
            mtps.append(float(out["mtp_per_depth"].mean()) if out["mtp_per_depth"].numel() else 0.0)
    for layer, recs in records.items():
        loads[layer] = sum(r.counts for r in recs).cpu()
    model.train()
    vio = [max_violation(load) for load in loads.values()]
    return {"val_loss": sum(losses) / len(losses), "val_mtp_loss": sum(mtps) / len(mtps),
            "val_maxvio": sum(vio) / len(vio), "val_maxvio_per_layer": vio,
            "val_load": {str(k): v.tolist() for k, v in loads.items()}}


def build_model(cfg: TrainConfig) -> DeepseekV3:
    """The model of a run, seeded (moe_impl "loop": the readable experts, which autograd follows;
    cfg.attn_impl's attention)."""
    torch.manual_seed(cfg.seed)
    model = DeepseekV3(small_config(**cfg.model), attn_impl=cfg.attn_impl)
    if cfg.fp8:
        fp8_training_layers(model, cfg.fp8_kernel)
    return model.to(device=cfg.device, dtype=DTYPES[cfg.dtype]).train()


def _optimizer(model: DeepseekV3, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), foreach=False)


def train(cfg: TrainConfig, resume: str | Path | None = None, corpus: Corpus | None = None,
          allow_changes: tuple[str, ...] = ()) -> dict:
    """Run training; returns the final metrics. Writes `metrics.jsonl` and checkpoints to cfg.out_dir.

    resume: a checkpoint folder of this run (`step_NNNNNN/`) to continue from; the run's configuration
    must equal the saved one in every field that changes the trajectory, except the fields named in
    allow_changes (said on stderr). The run stops with FloatingPointError naming the step at the first
    non-finite loss, gradient norm or metric, before the optimizer step (nothing non-finite is saved).
    The run folder's rules (never overwritten, never written through a link): dsv3ref.train.run_folder.
    """
    out = Path(cfg.out_dir)
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {cfg.device!r}, but torch finds no CUDA GPU on this machine")
    corpus = corpus or Corpus.stdlib(cfg.max_corpus_bytes)
    for split, data in (("training", corpus.train), ("validation", corpus.validation)):
        if data.numel() <= cfg.seq_len:
            raise ValueError(f"seq_len: {cfg.seq_len} bytes, but the corpus's {split} split holds only {data.numel()} "
                             "(raise max_corpus_bytes, or shorten seq_len)")
    model = build_model(cfg)
    optimizer = _optimizer(model, cfg)
    start, notes = load_checkpoint(Path(resume), model, optimizer, cfg, allow_changes) if resume else (0, [])
    rows = claim(out, Path(resume) if resume else None, start)
    for note in notes:
        print(note, file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / METRICS_FILE, rows)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc="train")
    tokens, t0, last = 0, time.perf_counter(), {}
    try:
        for step in bar:
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids = batch(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, step).to(cfg.device)
            with capture(model, grad=cfg.balance == "aux" or bool(cfg.seq_alpha)) as records:
                losses = model.loss(ids, mtp_weight(cfg, step))
                extra = balance_loss(records, cfg, cfg.batch_size)
            loss = losses["loss"] + extra.to(losses["loss"].device)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"step {step + 1}: the loss is {float(loss)}; stopping before the optimizer "
                                         "step (no checkpoint of this step is written)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if not math.isfinite(grad_norm):
                raise FloatingPointError(f"step {step + 1}: the gradient norm is {grad_norm}; stopping before the "
                                         "optimizer step (no checkpoint of this step is written)")
            optimizer.step()
            loads = {layer: sum(r.counts for r in recs).cpu() for layer, recs in records.items()}
            if cfg.balance == "bias":
                for layer, router in routers(model).items():
                    update_bias(router.e_score_correction_bias, loads[layer].to(cfg.device), bias_speed(cfg, step))
            tokens += ids.numel()
            row = {"step": step + 1, "lr": lr, "loss": losses["main"].item(), "mtp_loss": losses["mtp"].item(),
                   "balance_loss": extra.item(), "grad_norm": grad_norm,
                   "maxvio": sum(max_violation(v) for v in loads.values()) / len(loads)}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                row.update(evaluate(model, corpus.validation, cfg))
            log.add(row)
            last = row
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                log.write()
                save_checkpoint(step_folder(out, step + 1), model, optimizer, step + 1, cfg)
    finally:
        bar.close()
        log.write()
    last["tokens_per_second"] = tokens / (time.perf_counter() - t0)
    return last
