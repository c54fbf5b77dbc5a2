"""One rank of the distributed-training tests (tests/test_train_distributed.py starts world_size of these).

argv: REF OUT CASE [CASE ...], CASE "pp,ep,dp,schedule[,resume]". REF holds the single-process
reference the test computed with `dsv3ref.train.train` in float64 (`config.json`: the TrainConfig;
`grads.safetensors`: the gradients of step 1 before clipping; `final.safetensors`: weights and router
biases after the last step; `metrics.json`: its rows). For each case every rank:

- builds the layout's run and takes step 1's forward and backward: its summed gradients against the
  reference's, for every parameter it holds;
- trains the whole run with `train_distributed`, then compares its checkpoint's weights and biases
  with the reference's final ones, and rank 0 the metrics rows;
- with "resume": trains again from the checkpoint after step 2 into another folder and compares its
  final files with the uninterrupted run's, tensor by tensor (exact).

Rank 0 writes OUT/results.json: {case: {"grad": max abs error, "weights": ..., "bias": ..., "loss": ...,
"resume": ..., "params": how many parameters were compared (all ranks)}}.
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from dsv3ref.parallel.launch import init_from_env
from dsv3ref.train import TrainConfig
from dsv3ref.train.data import Corpus, batch
from dsv3ref.train.distributed import DistributedRun, Layout, train_distributed
from dsv3ref.train.distributed.checkpoint import rank_file
from dsv3ref.train.loop import mtp_weight

TIMEOUT = timedelta(seconds=60)


def corpus() -> Corpus:
    g = torch.Generator().manual_seed(7)
    return Corpus(train=torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8),
                  validation=torch.randint(0, 256, (1024,), generator=g, dtype=torch.uint8), files=(1, 1))


def max_error(pairs) -> float:
    return max([0.0] + [float((a.double() - b.double()).abs().max()) for a, b in pairs])


def world_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def world_sum(value: int) -> int:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t)


def experts_case() -> dict:
    """ExpertParallelExperts alone against the loop over all experts in one process, on every rank's tokens:
    random routing, and routing that sends every token to the first rank's experts (the others receive no
    rows, yet must join the backward's all-to-alls). Max abs errors of the output, the input gradient and
    the weight gradients of this rank's experts."""
    from dsv3ref.mlp import MLP
    from dsv3ref.moe import LoopExperts
    from dsv3ref.train.distributed.experts import ExpertParallelExperts

    rank, world = dist.get_rank(), dist.get_world_size()
    errors = {}
    for name, skewed in (("random", False), ("all to rank 0", True)):
        torch.manual_seed(0)
        n_experts, k, n = 4 * world, 2, 6
        loop = LoopExperts(MLP(8, 16) for _ in range(n_experts)).double()
        tokens = torch.randn(world, n, 8, dtype=torch.float64)  # every rank's tokens, the same on all ranks
        if skewed:
            ids = torch.stack([torch.randperm(n_experts // world)[:k] for _ in range(world * n)]).reshape(world, n, k)
        else:
            ids = torch.stack([torch.randperm(n_experts)[:k] for _ in range(world * n)]).reshape(world, n, k)
        weights = torch.rand(world, n, k, dtype=torch.float64)
        ref_in = tokens.clone().requires_grad_()
        ref_out = loop(ref_in.reshape(-1, 8), weights.reshape(-1, k), ids.reshape(-1, k)).reshape(world, n, 8)
        (ref_out * torch.arange(1.0, 9.0, dtype=torch.float64)).sum().backward()
        ref_grads = {e: [p.grad.clone() if p.grad is not None else None for p in loop[e].parameters()]
                     for e in range(n_experts)}
        loop.zero_grad(set_to_none=True)
        parallel = ExpertParallelExperts(loop, dist.group.WORLD)
        mine = tokens[rank].clone().requires_grad_()
        out = parallel(mine, weights[rank], ids[rank])
        (out * torch.arange(1.0, 9.0, dtype=torch.float64)).sum().backward()
        pairs = [(out, ref_out[rank]), (mine.grad, ref_in.grad[rank])]
        for e, expert in parallel.local.items():
            for p, g in zip(expert.parameters(), ref_grads[int(e)], strict=True):
                if g is not None or p.grad is not None:
                    pairs.append((p.grad, g))
        errors[name] = world_max(max_error(pairs))
    return errors


def run_case(ref: Path, out: Path, case: str) -> dict:
    if case == "experts":
        return experts_case()
    pp, ep, dp, schedule, *flags = case.split(",")
    layout = Layout(pp=int(pp), ep=int(ep), dp=int(dp), schedule=schedule)
    data = corpus()
    cfg = TrainConfig(**{**json.loads((ref / "config.json").read_text()), "out_dir": str(out / case.replace(",", "_")),
                         "save_every": 2 if "resume" in flags else 0})
    rank = dist.get_rank()

    run = DistributedRun(cfg, layout, TIMEOUT)  # step 1's gradients, before the clip
    run.forward_backward(batch(data.train, cfg.batch_size, cfg.seq_len, cfg.seed, 0), mtp_weight(cfg, 0))
    run.reduce_gradients()
    grads = load_file(ref / "grads.safetensors")
    pairs = [(p.grad, grads[run.names[id(p)]]) for p in run.params if p.grad is not None]
    missing = [run.names[id(p)] for p in run.params if (p.grad is None) != (run.names[id(p)] not in grads)]
    result = {"grad": world_max(max_error(pairs)), "grad_presence_mismatch": world_sum(len(missing)),
              "params": world_sum(len(pairs))}

    train_distributed(cfg, layout, corpus=data, timeout=TIMEOUT)
    final = load_file(ref / "final.safetensors")
    folder = Path(cfg.out_dir) / f"step_{cfg.steps:06d}"
    mine = load_file(rank_file(folder, rank))
    weights = [(v, final[k[len("param/"):]]) for k, v in mine.items() if k.startswith("param/")]
    biases = [(v, final[k[len("buffer/"):]]) for k, v in mine.items() if k.startswith("buffer/")]
    result["weights"] = world_max(max_error(weights))
    result["bias"] = world_max(max_error(biases))
    result["biases_compared"] = world_sum(len(biases))
    if rank == 0:
        rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
        expected = json.loads((ref / "metrics.json").read_text())
        result["loss"] = max(abs(r[k] - e[k]) for r, e in zip(rows, expected, strict=True)
                             for k in ("loss", "mtp_loss", "grad_norm"))
    if "resume" in flags:
        again = TrainConfig(**{**json.loads((ref / "config.json").read_text()),
                               "out_dir": str(out / (case.replace(",", "_") + "_resumed")), "save_every": 2})
        train_distributed(again, layout, resume=Path(cfg.out_dir) / "step_000002", corpus=data, timeout=TIMEOUT)
        first = rank_file(folder, rank)
        second = rank_file(Path(again.out_dir) / f"step_{cfg.steps:06d}", rank)
        with safe_open(first, "pt") as a, safe_open(second, "pt") as b:
            same = sorted(a.keys()) == sorted(b.keys()) and all(
                torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        result["resume_differs"] = world_sum(0 if same else 1)
    return result


def main() -> None:
    ref, out, cases = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    rank, _, _ = init_from_env(timeout_s=TIMEOUT.total_seconds(), device="cpu")
    results = {}
    try:
        for case in cases:
            results[case] = run_case(ref, out, case)
            if rank == 0:
                print(case, results[case], flush=True)
    except Exception:
        traceback.print_exc()
        results["error"] = traceback.format_exc()
        (out / f"error_{rank}.txt").write_text(results["error"])
        raise
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
