"""One rank of tests/test_kernels.py's distributed dispatch test: argv world, rank, folder.

Runs DeepEP-style dispatch and combine (normal and low-latency, BF16 and FP8 payloads) as gloo
collectives and compares every rank's results with the single-process functions on the same tokens."""

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import dsv3ref.kernels as K
from dsv3ref.kernels import ep


def tokens(world: int):
    g = torch.Generator().manual_seed(world)
    xs = [torch.randn(3 + r, 256, generator=g) for r in range(world)]
    idx = [torch.stack([torch.randperm(2 * world, generator=g)[:3] for _ in range(3 + r)]) for r in range(world)]
    for r in range(world):
        idx[r][-1, 0] = -1
    return xs, idx, [torch.rand(3 + r, 3, generator=g) for r in range(world)]


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b, strict=True))
    return a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype == ep.E4M3 else a,
                                              b.view(torch.uint8) if b.dtype == ep.E4M3 else b)


def main() -> None:
    world, rank, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    folder.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    xs, idx, ws = tokens(world)
    experts = 2 * world
    for fp8 in (False, True):
        payloads = [ep.per_token_fp8(x) for x in xs] if fp8 else xs
        single = K.dispatch(payloads, idx, ws, experts)[rank]
        mine = K.dispatch_dist(payloads[rank], idx[rank], ws[rank], experts)
        assert same(mine.recv_x, single.recv_x) and same(mine.recv_topk_idx, single.recv_topk_idx)
        assert same(mine.recv_topk_weights, single.recv_topk_weights)
        assert mine.num_recv_tokens_per_expert_list == single.num_recv_tokens_per_expert_list
        back = [(r.recv_x if not fp8 else ep.dequantize_payload(r.recv_x)) * 3 for r in K.dispatch(payloads, idx, ws,
                                                                                                 experts)]
        handles = [r.handle for r in K.dispatch(payloads, idx, ws, experts)]
        want = K.combine(back, handles)[rank][0]
        got, _ = K.combine_dist(back[rank], mine.handle)
        assert same(got, want)
        ll_single = K.low_latency_dispatch(xs, idx, 8, experts, use_fp8=fp8)
        ll = K.low_latency_dispatch_dist(xs[rank], idx[rank], 8, experts, use_fp8=fp8)
        assert same(ll.recv_x, ll_single[rank].recv_x) and same(ll.recv_count, ll_single[rank].recv_count)
        assert same(ll.handle["layout_range"], ll_single[rank].handle["layout_range"])
        outs = [ep.dequantize_payload(r.recv_x) * 2 for r in ll_single]
        want = K.low_latency_combine(outs, idx, ws, [r.handle for r in ll_single])[rank]
        assert same(K.low_latency_combine_dist(outs[rank], idx[rank], ws[rank], ll.handle), want)
    dist.destroy_process_group()
    print("equal")


if __name__ == "__main__":
    main()
