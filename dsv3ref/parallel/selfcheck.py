"""Check a parallel launch against one process: `torchrun --nproc-per-node N -m dsv3ref.parallel.selfcheck CKPT`.

Every rank loads its part of the checkpoint (dsv3ref.parallel.from_pretrained) and the whole model
(DeepseekV3.from_pretrained), both in float64, runs the same random tokens through both (with
layout "dp": rows of its own) and greedy-decodes a few tokens. Rank 0 prints one JSON line: the
largest relative difference of the logits over all ranks, whether every rank's tokens agree, and
the bytes each rank read from the checkpoint. Meant for small checkpoints (it holds the whole model
on every rank), to see on your own machines what the tests check.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from dsv3ref.generate import generate
from dsv3ref.impl import CHOICES
from dsv3ref.model import DeepseekV3
from dsv3ref.parallel.launch import init_from_env
from dsv3ref.parallel.plan import Parallel, from_pretrained


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="torchrun ... -m dsv3ref.parallel.selfcheck", description=__doc__)
    p.add_argument("ckpt")
    p.add_argument("--layout", choices=CHOICES["layout"], default="tp")
    p.add_argument("--moe-comm", choices=CHOICES["moe_comm"], default="allreduce")
    p.add_argument("--attn-impl", choices=CHOICES["attn_impl"], default="absorb")
    p.add_argument("--gemm-impl", choices=CHOICES["gemm_impl"], default="bf16")
    args = p.parse_args(argv)
    rank, world, device = init_from_env(timeout_s=120)
    kw = dict(dtype=torch.float64, attn_impl=args.attn_impl, gemm_impl=args.gemm_impl, device=device)
    model = from_pretrained(args.ckpt, parallel=Parallel(args.layout, args.moe_comm), **kw)
    whole = DeepseekV3.from_pretrained(args.ckpt, **kw)
    g = torch.Generator().manual_seed(0 if args.layout == "tp" else rank)  # dp: every rank its own rows
    ids = torch.randint(0, whole.config.vocab_size, (2, 8), generator=g).to(device)
    with torch.inference_mode():
        a, b = model(ids), whole(ids)
        err = ((a - b).abs().max() / b.abs().max()).item()
        if args.layout == "tp":
            same = generate(model, ids.tolist(), 5, eos_token_id=[]).tokens == generate(
                whole, ids.tolist(), 5, eos_token_id=[]).tokens
        else:
            same = True  # the rows differ per rank: see generate_data_parallel for generation
    report = [None] * world
    dist.all_gather_object(report, (err, same, model.load_report.bytes_read, whole.load_report.bytes_read))
    if rank == 0:
        print(json.dumps({"world_size": world, "layout": args.layout, "moe_comm": args.moe_comm,
                          "logits_rel_err": max(r[0] for r in report), "tokens_equal": all(r[1] for r in report),
                          "bytes_read_per_rank": [r[2] for r in report], "checkpoint_bytes": report[0][3]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
