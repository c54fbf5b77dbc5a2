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

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from dsv3ref.atomic import atomic_save_tensors, atomic_write_text
from dsv3ref.checkpoint import save_pretrained
from dsv3ref.config import ModelConfig
from dsv3ref.model import DeepseekV3
from dsv3ref.routing import DEFAULT_GAMMA, capture, routers, sequence_balance_loss, update_bias
from dsv3ref.train.data import VOCAB_SIZE, Corpus, batch
from dsv3ref.train.fp8 import fp8_training_layers

BALANCE = ("bias", "aux", "none")


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
    """Bias update speed (report: 0.001)."""
    aux_alpha: float = 0.01
    """Weight of the classic auxiliary loss when balance="aux"."""
    seq_alpha: float = 0.0
    """Weight of the sequence-wise balance loss (report: 0.0001; 0 switches it off)."""
    fp8: bool = False
    """Train the FP8 layers' GEMMs in FP8 (dsv3ref.train.fp8)."""
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

    def __post_init__(self) -> None:
        if self.balance not in BALANCE:
            raise ValueError(f"balance: found {self.balance!r}, expected one of {BALANCE}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, found {value!r}")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over cfg.warmup steps, then cosine from cfg.lr down to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


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
    """The model of a run, seeded (moe_impl "loop": the readable experts, which autograd follows)."""
    torch.manual_seed(cfg.seed)
    model = DeepseekV3(small_config(**cfg.model))
    if cfg.fp8:
        fp8_training_layers(model)
    return model.to(cfg.device).train()


def _optimizer(model: DeepseekV3, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), foreach=False)


def save_checkpoint(folder: Path, model: DeepseekV3, optimizer: torch.optim.AdamW, step: int, cfg: TrainConfig) -> None:
    """The model in the published format, the optimizer's moments, and where the run stands."""
    save_pretrained(model, folder)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, steps = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                tensors[f"{names[id(p)]}.exp_avg"] = state["exp_avg"].contiguous()
                tensors[f"{names[id(p)]}.exp_avg_sq"] = state["exp_avg_sq"].contiguous()
                steps[names[id(p)]] = float(state["step"])
    atomic_save_tensors(folder / "optimizer.safetensors", tensors)
    atomic_write_text(folder / "train_state.json", json.dumps(
        {"step": step, "adam_steps": steps, "config": dataclasses.asdict(cfg)}, indent=1) + "\n")


def load_checkpoint(folder: Path, model: DeepseekV3, optimizer: torch.optim.AdamW) -> int:
    """Restore a save_checkpoint folder into a run's model and optimizer; returns the step to continue from."""
    folder = Path(folder)
    state = json.loads((folder / "train_state.json").read_text())
    weights = DeepseekV3.from_pretrained(folder).state_dict()
    missing = model.load_state_dict(weights, strict=False)
    if missing.missing_keys:
        raise ValueError(f"{folder}: checkpoint lacks {missing.missing_keys[:3]} of this run's model")
    moments = load_file(folder / "optimizer.safetensors")
    params = dict(model.named_parameters())
    for name, adam_step in state["adam_steps"].items():
        p = params[name]
        optimizer.state[p] = {"step": torch.tensor(adam_step), "exp_avg": moments[f"{name}.exp_avg"].clone(),
                              "exp_avg_sq": moments[f"{name}.exp_avg_sq"].clone()}
    return int(state["step"])


def train(cfg: TrainConfig, resume: str | Path | None = None, corpus: Corpus | None = None) -> dict:
    """Run training; returns the final metrics. Writes `metrics.jsonl` and checkpoints to cfg.out_dir."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus or Corpus.stdlib(cfg.max_corpus_bytes)
    model = build_model(cfg)
    optimizer = _optimizer(model, cfg)
    start = load_checkpoint(Path(resume), model, optimizer) if resume else 0
    metrics_file = out / "metrics.jsonl"
    log = metrics_file.open("a" if resume else "w")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc="train")
    tokens, t0, last = 0, time.perf_counter(), {}
    for step in bar:
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = batch(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, step).to(cfg.device)
        late = cfg.mtp_lambda_late is not None and step >= cfg.mtp_switch * cfg.steps
        with capture(model, grad=cfg.balance == "aux" or bool(cfg.seq_alpha)) as records:
            losses = model.loss(ids, cfg.mtp_lambda_late if late else cfg.mtp_lambda)
            extra = balance_loss(records, cfg, cfg.batch_size)
        loss = losses["loss"] + extra.to(losses["loss"].device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        loads = {layer: sum(r.counts for r in recs).cpu() for layer, recs in records.items()}
        if cfg.balance == "bias":
            for layer, router in routers(model).items():
                update_bias(router.e_score_correction_bias, loads[layer].to(cfg.device), cfg.gamma)
        tokens += ids.numel()
        row = {"step": step + 1, "lr": lr, "loss": losses["main"].item(), "mtp_loss": losses["mtp"].item(),
               "balance_loss": extra.item(), "grad_norm": grad_norm,
               "maxvio": sum(max_violation(v) for v in loads.values()) / len(loads)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row.update(evaluate(model, corpus.validation, cfg))
        log.write(json.dumps(row) + "\n")
        log.flush()
        last = row
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(out / f"step_{step + 1:06d}", model, optimizer, step + 1, cfg)
    log.close()
    save_checkpoint(out / f"step_{cfg.steps:06d}", model, optimizer, cfg.steps, cfg)
    last["tokens_per_second"] = tokens / (time.perf_counter() - t0)
    return last
