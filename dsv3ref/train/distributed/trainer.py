"""The training step across processes: pipeline schedule, expert all-to-alls, gradients summed where
the parameters are replicated, ZeRO-1 AdamW, and the router bias updated from the global load.

One step of `train_distributed`, on every rank:

1. the global batch of the step (`dsv3ref.train.data.batch`, the same as the single-process loop's),
   cut into ep x dp data shards; this rank reads its shard, in `microbatches` micro-batches;
2. the pipeline schedule runs the forward and backward passes of this rank's stages;
3. gradients: summed over the micro-batches by the schedule, then over the ranks that hold the
   same parameter and read other tokens (dense: the data group; experts: the dp group; the
   embedding copy of a straight pipeline: also the tied pair), and divided by micro-batches x data
   shards, which gives the gradient of the mean loss over the global batch;
4. the global gradient norm (each parameter counted once) and the clip, as `clip_grad_norm_`;
5. AdamW on this rank's share of the optimizer state (ZeRO-1: `torch.distributed.optim.
   ZeroRedundancyOptimizer`, which steps its partition and broadcasts the new weights);
6. the router bias: the expert loads counted by the routers of this rank's layers, summed over
   the data group (the report's bias follows the load of the whole batch), then the sign rule.

ZeRO-1 rather than FSDP2's `fully_shard`: the report shards the optimizer state only (section 3.2),
keeping whole weights on every rank, so a pipeline stage's weights are all there for each of its
micro-batches; fully_shard would also shard the weights and gather them before every use (ZeRO-3).

Validation is not run here: the single-process loop (`dsv3ref.train.train`) evaluates a model, and
a distributed checkpoint is read back by `load_distributed_checkpoint`.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from dsv3ref.routing import capture, routers, update_bias
from dsv3ref.train.data import Corpus, batch
from dsv3ref.train.distributed.checkpoint import (
    load_distributed_checkpoint,
    on_rank_zero,
    save_distributed_checkpoint,
)
from dsv3ref.train.distributed.experts import ExpertParallelExperts, shard_experts
from dsv3ref.train.distributed.layout import Groups, Layout, collective_device, split_layers
from dsv3ref.train.distributed.stages import Stage, objective, pipeline_stages, schedule
from dsv3ref.train.loop import TrainConfig, bias_speed, build_model, learning_rate, max_violation, mtp_weight
from dsv3ref.train.run_folder import METRICS_FILE, MetricsLog, claim


class DistributedRun:
    """This rank's part of a run: its stages, their schedule, its optimizer shards, its routers."""

    def __init__(self, cfg: TrainConfig, layout: Layout, timeout: timedelta = timedelta(minutes=5)):
        unsupported = [f"{name}={getattr(cfg, name)!r}" for name, ok in
                       (("balance", cfg.balance in ("bias", "none")), ("seq_alpha", not cfg.seq_alpha),
                        ("fp8", not cfg.fp8), ("attn_impl", cfg.attn_impl == "naive")) if not ok]
        if unsupported:
            raise ValueError(f"distributed training: {', '.join(unsupported)} is not supported across processes "
                             "(expected balance 'bias' or 'none', seq_alpha 0, fp8 off, attn_impl 'naive'); the "
                             "single-process loop trains them")
        if not dist.is_initialized():
            raise RuntimeError("distributed training: no process group; launch with torchrun (or call "
                               "torch.distributed.init_process_group first)")
        self.cfg, self.layout = cfg, layout
        self.model = model = build_model(cfg)  # the whole model, seeded: every rank starts from the same weights
        mc = model.config
        layout.check(dist.get_world_size(), mc.num_hidden_layers, mc.n_routed_experts, cfg.batch_size)
        self.groups = groups = Groups.build(layout, timeout)
        self.rank = rank = dist.get_rank()
        self.names = {id(p): n for n, p in model.named_parameters()}
        pp_rank, self.dp_rank, self.ep_rank = layout.coords(rank)
        stage_ids = layout.stages_of(pp_rank)
        layers = split_layers(mc.num_hidden_layers, layout.num_stages)
        self.modules = [Stage(model, s, layout.num_stages, layers[s]) for s in stage_ids]
        if layout.ep > 1:
            shard_experts(self.modules, groups.ep)
        self.has_first = any(m.first for m in self.modules)
        self.has_last = any(m.last for m in self.modules)
        self.params = list({id(p): p for m in self.modules for p in m.parameters()}.values())
        experts = {id(p) for m in self.modules for x in m.modules() if isinstance(x, ExpertParallelExperts)
                   for p in x.parameters()}
        self.expert_params = [p for p in self.params if id(p) in experts]
        self.dense_params = [p for p in self.params if id(p) not in experts]
        self.embedding = model.model.embed_tokens.weight
        held_layers = {int(i) for m in self.modules for i in m.layers}
        held_layers |= {mc.num_hidden_layers + d for d in range(len(model.mtp_layers)) if self.has_last}
        self.routers = {i: r for i, r in routers(model).items() if i in held_layers}
        self.microbatch = cfg.batch_size // layout.data_shards // layout.microbatches
        self.stages = pipeline_stages(model, self.modules, layout, groups.pp, self.microbatch, cfg.seq_len)
        self.step_losses: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mtp_lambda = cfg.mtp_lambda
        self.schedule = schedule(self.stages, layout, self._loss)
        self.optimizers = [self._zero(self.dense_params, groups.data), self._zero(self.expert_params, groups.dp)]

    def _loss(self, logits: tuple[torch.Tensor, ...], ids: torch.Tensor) -> torch.Tensor:
        loss, main, per_depth = objective(logits, ids, self.mtp_lambda)
        self.step_losses.append((main.detach(), per_depth.detach()))
        return loss

    def _zero(self, params: list[torch.nn.Parameter], group) -> ZeroRedundancyOptimizer | None:
        """AdamW as the single-process loop sets it up (weight decay on matrices only), its state sharded
        over `group` (ZeRO-1)."""
        if not params:
            return None
        decay = [p for p in params if p.dim() >= 2]
        other = [p for p in params if p.dim() < 2]
        param_groups = [g for g in ({"params": decay, "weight_decay": self.cfg.weight_decay},
                                    {"params": other, "weight_decay": 0.0}) if g["params"]]
        return ZeroRedundancyOptimizer(param_groups, optimizer_class=torch.optim.AdamW, process_group=group,
                                       lr=self.cfg.lr, betas=(0.9, 0.95), foreach=False)

    def shard_of(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch."""
        rows = ids.shape[0] // self.layout.data_shards
        start = self.layout.data_shard(self.rank) * rows
        return ids[start:start + rows]

    def forward_backward(self, ids: torch.Tensor, mtp_lambda: float) -> dict[int, torch.Tensor]:
        """Run the schedule on this rank's shard of the global batch ids; gradients are left summed over the
        micro-batches. Returns the expert loads counted by this rank's routers."""
        shard = self.shard_of(ids)
        self.mtp_lambda, self.step_losses = mtp_lambda, []
        for p in self.params:
            p.grad = None
        with capture(self.model) as records:
            self.schedule.step(*((shard,) if self.has_first else ()), target=shard if self.has_last else None,
                               ids=shard)
        return {i: sum(r.counts for r in records[i]) for i in self.routers}

    def reduce_gradients(self) -> None:
        """Sum gradients where a parameter is replicated and divide by micro-batches x data shards."""
        scale = self.layout.microbatches * self.layout.data_shards
        _sum_gradients(self.dense_params, self.groups.data)
        _sum_gradients(self.expert_params, self.groups.dp)
        if self.groups.tied is not None:
            _sum_gradients([self.embedding], self.groups.tied)
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(scale)

    def clip(self) -> float:
        """The global gradient norm (every parameter counted once over the world) and the clip to cfg.grad_clip,
        as torch.nn.utils.clip_grad_norm_ computes it."""
        pp_rank = self.layout.coords(self.rank)[0]
        counted = []
        if self.dp_rank == 0 and self.ep_rank == 0:  # dense parameters: one rank of each data group
            counted += [p for p in self.dense_params if not (p is self.embedding and self.groups.tied is not None
                                                             and pp_rank != 0)]
        if self.dp_rank == 0:  # experts: one replica of each shard
            counted += self.expert_params
        square = torch.zeros((), dtype=torch.float64, device=collective_device())
        for p in counted:
            if p.grad is not None:
                square += p.grad.double().pow(2).sum().to(square.device)
        dist.all_reduce(square)
        norm = float(square.sqrt())
        coef = min(self.cfg.grad_clip / (norm + 1e-6), 1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(coef)
        return norm

    def optimizer_step(self, lr: float) -> None:
        for opt in self.optimizers:
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()

    def update_biases(self, loads: dict[int, torch.Tensor], gamma: float) -> dict[int, torch.Tensor]:
        """Sum the loads over the data group and apply the sign rule to every router of this rank; returns
        the global loads."""
        total = {}
        for i, router in self.routers.items():
            load = torch.as_tensor(loads[i], dtype=torch.float64).to(collective_device(), copy=True)
            if dist.get_world_size(self.groups.data) > 1:
                dist.all_reduce(load, group=self.groups.data)
            total[i] = load
            if self.cfg.balance == "bias":
                update_bias(router.e_score_correction_bias, load.to(router.e_score_correction_bias.device), gamma)
        return total

    def step_metrics(self) -> tuple[float, float]:
        """(main loss, MTP loss per depth averaged) of the step, averaged over the global batch, on every rank."""
        values = torch.zeros(2, dtype=torch.float64, device=collective_device())
        if self.has_last:
            mains = torch.stack([m for m, _ in self.step_losses]).double()
            depths = [d.double().mean() for _, d in self.step_losses if d.numel()]
            values[0] = mains.mean() / self.layout.data_shards
            values[1] = (torch.stack(depths).mean() if depths else 0.0) / self.layout.data_shards
        dist.all_reduce(values)  # only the last pipeline rank's data group contributes
        return float(values[0]), float(values[1])


def _sum_gradients(params: list[torch.nn.Parameter], group) -> None:
    """All-reduce (sum) the gradients of params over group in one flat buffer; a parameter that no rank
    gave a gradient (an expert no token chose) keeps none, as in a single process."""
    if not params or group is None or dist.get_world_size(group) == 1:
        return
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64,
                           device=collective_device())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(present, group=group)
    dist.all_reduce(flat, group=group)
    offset = 0
    for p, seen in zip(params, present.tolist(), strict=True):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone() if seen else None
        offset += n


def train_distributed(cfg: TrainConfig, layout: Layout, resume: str | Path | None = None,
                      corpus: Corpus | None = None, timeout: timedelta = timedelta(minutes=5)) -> dict:
    """Train across the processes of a torchrun job (every rank calls it); returns the last step's metrics
    (the same dict on every rank). Rank 0 writes metrics.jsonl; checkpoints (`save_every`, and at the end)
    are folders of one safetensors file per rank (dsv3ref.train.distributed.checkpoint)."""
    corpus = corpus or Corpus.stdlib(cfg.max_corpus_bytes)
    if corpus.train.numel() <= cfg.seq_len:
        raise ValueError(f"seq_len: {cfg.seq_len} bytes, but the corpus's training split holds only "
                         f"{corpus.train.numel()} (raise max_corpus_bytes, or shorten seq_len)")
    run = DistributedRun(cfg, layout, timeout)
    out = Path(cfg.out_dir)
    start = load_distributed_checkpoint(Path(resume), run) if resume else 0

    def claim_folder() -> MetricsLog:
        rows = claim(out, Path(resume) if resume else None, start)
        out.mkdir(parents=True, exist_ok=True)
        return MetricsLog(out / METRICS_FILE, rows)

    log = on_rank_zero(claim_folder, f"claiming {out}")  # rank 0 writes metrics.jsonl; None elsewhere
    last, tokens, t0 = {}, 0, time.perf_counter()
    for step in range(start, cfg.steps):
        ids = batch(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, step).to(cfg.device)
        loads = run.forward_backward(ids, mtp_weight(cfg, step))
        main, mtp = run.step_metrics()
        if not math.isfinite(main):
            raise FloatingPointError(f"step {step + 1}: the loss is {main}; stopping before the optimizer step")
        run.reduce_gradients()
        grad_norm = run.clip()
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"step {step + 1}: the gradient norm is {grad_norm}; stopping before the "
                                     "optimizer step")
        lr = learning_rate(cfg, step)
        run.optimizer_step(lr)
        loads = run.update_biases(loads, bias_speed(cfg, step))
        vio = torch.tensor([sum(max_violation(v) for v in loads.values()), len(loads)], dtype=torch.float64,
                           device=collective_device())
        if run.ep_rank or run.dp_rank:
            vio.zero_()
        dist.all_reduce(vio)  # one rank per pipeline stage: every MoE layer once
        tokens += ids.numel()
        last = {"step": step + 1, "lr": lr, "loss": main, "mtp_loss": mtp * mtp_weight(cfg, step),
                "grad_norm": grad_norm, "maxvio": float(vio[0] / vio[1]) if vio[1] else 0.0,
                "tokens_per_second": tokens / (time.perf_counter() - t0)}
        if log is not None:
            log.add(last)
        if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            if log is not None:
                log.write()
            save_distributed_checkpoint(out, step + 1, run)
    if log is not None:
        log.write()
    return last
