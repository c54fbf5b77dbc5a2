"""Expert dispatch and combine with DeepEP's semantics, normal and low-latency.

Expert parallelism puts experts num_experts / R to a rank (rank r owns experts r*E/R .. (r+1)*E/R - 1).
Each rank routes its own tokens (topk_idx (n, k), -1 = no expert), sends each token where its experts
live, and gets the experts' outputs back.

**Normal mode** (prefill, training): a token goes once to every rank holding at least one of its
experts (`is_token_in_rank` (n, R)), whatever the number of its experts there.

    get_dispatch_layout -> num_tokens_per_rank (R,), None, num_tokens_per_expert (E,), is_token_in_rank (n, R)
    dispatch: rank r receives recv_x (m_r, hidden): rank 0's tokens first, then rank 1's, ..., each
      source's in token order; recv_topk_idx (m_r, k) with the experts renumbered local to r and -1 for
      experts elsewhere; recv_topk_weights (m_r, k), 0 where the expert is elsewhere;
      num_recv_tokens_per_expert_list [E/R]; a handle remembering where every row came from.
    combine: each rank sends its (m_r, hidden) results back; a source token receives one row from
      every rank it went to and they are **summed without weights** (the experts' side applies them),
      in float32, rank order, then cast to x's dtype. topk_weights, if given, are summed the same way.

**Low-latency mode** (decoding, CUDA graphs): a token goes once per chosen expert, into a fixed-size
receive buffer per local expert, so no count need reach the host:

    recv_x (E/R, num_max_dispatch_tokens_per_rank * R, hidden), with FP8 payload a pair (E4M3 values,
      float32 scales (E/R, max * R, hidden/128): 1 x 128 tiles, powers of two with round_scale);
      expert e's rows: rank 0's tokens for it, then rank 1's, ... (token order within a source here;
      DeepEP's kernel fills slots within a source in whatever order its warps finish);
    recv_count (E/R,) int32: valid rows per local expert; rows past it hold nothing meaningful;
    low_latency_combine: each source token gets sum_k topk_weights[t, k] * (its row at expert k),
      **with weights**, in float32 in k order, in x's dtype.

Each function exists twice: over a list of ranks in one process (`dispatch`, `combine`,
`low_latency_dispatch`, `low_latency_combine`), and as a torch.distributed collective that every rank
of `group` calls with its own tokens (`dispatch_dist`, ...; all-to-alls, gloo or NCCL); the tests hold
them equal. Bytes moved: `dispatch_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from einops import rearrange

from dsv3ref.fp8 import BLOCK, E4M3, quantize_activation

Payload = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""Tokens as (n, hidden) in high precision, or (E4M3 (n, hidden), scales (n, hidden / 128))."""


def _experts_per_rank(num_experts: int, num_ranks: int) -> int:
    if num_ranks <= 0 or num_experts % num_ranks:
        raise ValueError(f"num_experts: {num_experts} experts do not split evenly over {num_ranks} ranks")
    return num_experts // num_ranks


def _check_topk(name: str, topk_idx: torch.Tensor, n: int, num_experts: int) -> None:
    if topk_idx.dim() != 2 or topk_idx.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n}, num_topk) (one row per token), found {tuple(topk_idx.shape)}")
    if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= num_experts):
        raise ValueError(f"{name}: expert ids must lie in -1..{num_experts - 1}, found "
                         f"{int(topk_idx.min())}..{int(topk_idx.max())}")


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """(num_tokens_per_rank (R,) int32, None (no RDMA ranks in one node), num_tokens_per_expert (E,)
    int32, is_token_in_rank (n, R) bool) for tokens routed to topk_idx (n, k)."""
    per = _experts_per_rank(num_experts, num_ranks)
    _check_topk("topk_idx", topk_idx, topk_idx.shape[0], num_experts)
    rank_of = torch.where(topk_idx >= 0, topk_idx // per, -1)  # (n, k)
    is_token_in_rank = (rank_of[..., None] == torch.arange(num_ranks, device=topk_idx.device)).any(1)  # (n, R)
    per_expert = torch.bincount(topk_idx[topk_idx >= 0].long(), minlength=num_experts).int()
    return is_token_in_rank.sum(0).int(), None, per_expert, is_token_in_rank


def _rows(x: Payload, index: torch.Tensor) -> Payload:
    return (x[0][index], x[1][index]) if isinstance(x, tuple) else x[index]


def _cat(parts: list[Payload]) -> Payload:
    if isinstance(parts[0], tuple):
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return torch.cat(parts)


def _localize(topk_idx: torch.Tensor, topk_weights: torch.Tensor, rank: int, per: int):
    local = (topk_idx >= rank * per) & (topk_idx < (rank + 1) * per)
    return torch.where(local, topk_idx - rank * per, -1), torch.where(local, topk_weights, 0)


@dataclass
class Received:
    """What one rank receives from `dispatch` (DeepEP's return values, by name)."""

    recv_x: Payload
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert_list: list[int]
    handle: dict
    """src_rank (m,), src_token (m,): where each received row came from; num_tokens: tokens per source."""


def dispatch(x: list[Payload], topk_idx: list[torch.Tensor], topk_weights: list[torch.Tensor],
             num_experts: int) -> list[Received]:
    """Normal-mode dispatch over a list of ranks (x[r], topk_idx[r], topk_weights[r]: rank r's tokens)."""
    ranks = len(x)
    per = _experts_per_rank(num_experts, ranks)
    layouts = [get_dispatch_layout(idx, num_experts, ranks)[3] for idx in topk_idx]
    out = []
    for dst in range(ranks):
        picks = [layouts[src][:, dst].nonzero().flatten() for src in range(ranks)]
        idx, w = _localize(torch.cat([topk_idx[s][p] for s, p in enumerate(picks)]),
                           torch.cat([topk_weights[s][p] for s, p in enumerate(picks)]), dst, per)
        out.append(Received(
            recv_x=_cat([_rows(x[s], p) for s, p in enumerate(picks)]), recv_topk_idx=idx, recv_topk_weights=w,
            num_recv_tokens_per_expert_list=[int((idx == e).sum()) for e in range(per)],
            handle={"src_rank": torch.cat([torch.full_like(p, s) for s, p in enumerate(picks)]),
                    "src_token": torch.cat(picks), "num_tokens": [len(i) for i in topk_idx]}))
    return out


def _sum_back(parts: list[tuple[torch.Tensor, torch.Tensor]], n: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows (token index, values) from each rank in rank order, summed per token in float32."""
    width = parts[0][1].shape[1:]
    acc = torch.zeros(n, *width, dtype=torch.promote_types(dtype, torch.float32), device=parts[0][1].device)
    for token, values in parts:
        acc.index_add_(0, token, values.to(acc.dtype))
    return acc.to(dtype)


def combine(x: list[torch.Tensor], handles: list[dict], topk_weights: list[torch.Tensor] | None = None
            ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Normal-mode combine over a list of ranks: x[r] (m_r, hidden) are rank r's results for the rows
    it received; returns each source rank's (combined_x (n, hidden), combined_topk_weights or None)."""
    ranks = len(x)
    out = []
    for src in range(ranks):
        n = handles[0]["num_tokens"][src]
        picks = [(h["src_rank"] == src).nonzero().flatten() for h in handles]
        combined = _sum_back([(handles[d]["src_token"][p], x[d][p]) for d, p in enumerate(picks)], n, x[0].dtype)
        weights = None if topk_weights is None else _sum_back(
            [(handles[d]["src_token"][p], topk_weights[d][p]) for d, p in enumerate(picks)], n, topk_weights[0].dtype)
        out.append((combined, weights))
    return out


def _payload(x: torch.Tensor, use_fp8: bool, round_scale: bool) -> Payload:
    """The low-latency payload: x itself, or its E4M3 1 x 128 cast (DeepEP casts on the sending side)."""
    if not use_fp8:
        return x
    if x.shape[-1] % BLOCK:
        raise ValueError(f"x: hidden = {x.shape[-1]} is not a multiple of {BLOCK}, which the FP8 payload's 1 x 128 "
                         "scales need")
    return quantize_activation(x, scale_fmt="ue8m0" if round_scale else None)


@dataclass
class LowLatencyReceived:
    """What one rank receives from `low_latency_dispatch`."""

    recv_x: Payload
    recv_count: torch.Tensor
    handle: dict
    """src_info (E/R, max * R): the source token of each slot (-1: empty); layout_range (E/R, R) int64:
    (first slot << 32) | count per source rank, as DeepEP packs it; src_rank (E/R, max * R)."""


def _check_max(name: str, n: int, limit: int) -> None:
    if n > limit:
        raise ValueError(f"{name}: {n} tokens, more than num_max_dispatch_tokens_per_rank={limit} (every rank's "
                         f"buffers hold that many per source)")


def low_latency_dispatch(x: list[torch.Tensor], topk_idx: list[torch.Tensor], num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, use_fp8: bool = True, round_scale: bool = False
                         ) -> list[LowLatencyReceived]:
    """Low-latency dispatch over a list of ranks (see the module docstring for the layout)."""
    ranks = len(x)
    per = _experts_per_rank(num_experts, ranks)
    cap = num_max_dispatch_tokens_per_rank * ranks
    for r, idx in enumerate(topk_idx):
        _check_max(f"x[{r}]", x[r].shape[0], num_max_dispatch_tokens_per_rank)
        _check_topk(f"topk_idx[{r}]", idx, x[r].shape[0], num_experts)
    payloads = [_payload(t, use_fp8, round_scale) for t in x]
    out = []
    for dst in range(ranks):
        hidden = x[0].shape[1]
        template = payloads[0]
        if isinstance(template, tuple):
            recv = (template[0].new_zeros(per, cap, hidden), template[1].new_zeros(per, cap, hidden // BLOCK))
        else:
            recv = template.new_zeros(per, cap, hidden)
        count = torch.zeros(per, dtype=torch.int32)
        src_info = torch.full((per, cap), -1, dtype=torch.int32)
        src_rank = torch.full((per, cap), -1, dtype=torch.int32)
        layout_range = torch.zeros(per, ranks, dtype=torch.int64)
        for le in range(per):
            pos = 0
            for src in range(ranks):
                tokens = (topk_idx[src] == dst * per + le).any(1).nonzero().flatten()
                rows = _rows(payloads[src], tokens)
                if isinstance(recv, tuple):
                    recv[0][le, pos:pos + len(tokens)], recv[1][le, pos:pos + len(tokens)] = rows
                else:
                    recv[le, pos:pos + len(tokens)] = rows
                src_info[le, pos:pos + len(tokens)] = tokens.int()
                src_rank[le, pos:pos + len(tokens)] = src
                layout_range[le, src] = (pos << 32) | len(tokens)
                pos += len(tokens)
            count[le] = pos
        out.append(LowLatencyReceived(recv, count, {"src_info": src_info, "layout_range": layout_range,
                                                    "src_rank": src_rank}))
    return out


def _weighted_sum(rows: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows (n, k, hidden) (zeros where no expert), weights (n, k) -> sum_k w * row in float32, k in order."""
    acc = torch.zeros(rows.shape[0], rows.shape[2], dtype=torch.promote_types(dtype, torch.float32),
                      device=rows.device)
    for k in range(rows.shape[1]):
        acc = acc + weights[:, k, None].to(acc.dtype) * rows[:, k].to(acc.dtype)
    return acc.to(dtype)


def low_latency_combine(x: list[torch.Tensor], topk_idx: list[torch.Tensor], topk_weights: list[torch.Tensor],
                        handles: list[dict]) -> list[torch.Tensor]:
    """Low-latency combine over a list of ranks: x[r] (E/R, max * R, hidden) are rank r's expert outputs
    in its receive layout; returns each source rank's (n, hidden) weighted sum."""
    ranks = len(x)
    per = x[0].shape[0]
    out = []
    for src in range(ranks):
        idx = topk_idx[src]
        n, k = idx.shape
        rows = x[0].new_zeros(n, k, x[0].shape[2])
        for t in range(n):
            for j, e in enumerate(idx[t].tolist()):
                if e < 0:
                    continue
                h = handles[e // per]
                slot = ((h["src_rank"][e % per] == src) & (h["src_info"][e % per] == t)).nonzero().flatten()
                rows[t, j] = x[e // per][e % per, int(slot[0])]
        out.append(_weighted_sum(rows, topk_weights[src], x[0].dtype))
    return out


def dispatch_bytes(hidden: int, num_topk: int, dtype: torch.dtype = torch.bfloat16, use_fp8: bool = False
                   ) -> int:
    """Bytes one token's dispatch moves per destination rank: its hidden state (FP8 + one float32 scale
    per 128 channels, or `dtype`), its top-k expert ids (int64) and weights (float32)."""
    body = hidden + 4 * (hidden // BLOCK) if use_fp8 else hidden * torch.empty((), dtype=dtype).element_size()
    return body + num_topk * (8 + 4)


# ------------------------------------------------------------------------------ torch.distributed collectives
def _wire(t: torch.Tensor) -> torch.Tensor:
    """t as bytes gloo can carry (it has no float8 type)."""
    return t.contiguous().view(torch.uint8) if t.dtype == E4M3 else t.contiguous()


def _all_to_all(t: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group) -> torch.Tensor:
    wire = _wire(t)
    out = wire.new_empty(sum(out_sizes), *wire.shape[1:])
    dist.all_to_all_single(out, wire, out_sizes, in_sizes, group=group)
    return out.view(t.dtype) if t.dtype == E4M3 else out


def _sizes(send: list[int], group) -> list[int]:
    recv = torch.zeros(len(send), dtype=torch.int64)
    dist.all_to_all_single(recv, torch.tensor(send, dtype=torch.int64), group=group)
    return recv.tolist()


def _send_payload(x: Payload, order: torch.Tensor, out_sizes, in_sizes, group) -> Payload:
    if isinstance(x, tuple):
        return tuple(_all_to_all(part[order], out_sizes, in_sizes, group) for part in x)
    return _all_to_all(x[order], out_sizes, in_sizes, group)


def dispatch_dist(x: Payload, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                  group=None) -> Received:
    """`dispatch` as a collective: every rank of group calls it with its own tokens."""
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    per = _experts_per_rank(num_experts, ranks)
    in_rank = get_dispatch_layout(topk_idx, num_experts, ranks)[3]  # (n, R)
    picks = [in_rank[:, dst].nonzero().flatten() for dst in range(ranks)]
    order, in_sizes = torch.cat(picks), [len(p) for p in picks]
    out_sizes = _sizes(in_sizes, group)
    recv_x = _send_payload(x, order, out_sizes, in_sizes, group)
    idx, w = _localize(_all_to_all(topk_idx[order], out_sizes, in_sizes, group),
                       _all_to_all(topk_weights[order], out_sizes, in_sizes, group), rank, per)
    src_token = _all_to_all(order, out_sizes, in_sizes, group)
    n_tokens = [int(v) for v in _sizes([topk_idx.shape[0]] * ranks, group)]
    src_rank = torch.cat([torch.full((c,), s, dtype=torch.long) for s, c in enumerate(out_sizes)])
    return Received(recv_x, idx, w, [int((idx == e).sum()) for e in range(per)],
                    {"src_rank": src_rank, "src_token": src_token, "num_tokens": n_tokens,
                     "in_sizes": in_sizes, "out_sizes": out_sizes})


def combine_dist(x: torch.Tensor, handle: dict, topk_weights: torch.Tensor | None = None, group=None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`combine` as a collective: x (m, hidden) this rank's results for the rows it received."""
    back_in, back_out = handle["out_sizes"], handle["in_sizes"]  # the dispatch, reversed
    rank = dist.get_rank(group)
    n = handle["num_tokens"][rank]
    tokens = _all_to_all(handle["src_token"], back_out, back_in, group)
    splits = torch.tensor(back_out).cumsum(0).tolist()

    def summed(values: torch.Tensor) -> torch.Tensor:
        returned = _all_to_all(values, back_out, back_in, group)
        parts = [(tokens[a:b], returned[a:b]) for a, b in zip([0] + splits[:-1], splits, strict=True)]
        return _sum_back(parts, n, values.dtype)

    return summed(x), None if topk_weights is None else summed(topk_weights)


def low_latency_dispatch_dist(x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                              num_experts: int, use_fp8: bool = True, round_scale: bool = False, group=None
                              ) -> LowLatencyReceived:
    """`low_latency_dispatch` as a collective."""
    ranks = dist.get_world_size(group)
    per = _experts_per_rank(num_experts, ranks)
    _check_max("x", x.shape[0], num_max_dispatch_tokens_per_rank)
    _check_topk("topk_idx", topk_idx, x.shape[0], num_experts)
    token, slot = (topk_idx >= 0).nonzero(as_tuple=True)
    expert = topk_idx[token, slot]
    order = torch.argsort(expert * x.shape[0] + token)  # by destination rank, local expert, token
    token, expert = token[order], expert[order]
    in_sizes = torch.bincount(expert // per, minlength=ranks).tolist()
    out_sizes = _sizes(in_sizes, group)
    payload = _send_payload(_payload(x, use_fp8, round_scale), token, out_sizes, in_sizes, group)
    r_token = _all_to_all(token, out_sizes, in_sizes, group)
    r_expert = _all_to_all(expert, out_sizes, in_sizes, group) % per
    r_src = torch.cat([torch.full((c,), s, dtype=torch.long) for s, c in enumerate(out_sizes)])
    cap = num_max_dispatch_tokens_per_rank * ranks
    hidden = x.shape[1]
    if isinstance(payload, tuple):
        recv = (payload[0].new_zeros(per, cap, hidden), payload[1].new_zeros(per, cap, hidden // BLOCK))
    else:
        recv = payload.new_zeros(per, cap, hidden)
    count = torch.zeros(per, dtype=torch.int32)
    src_info = torch.full((per, cap), -1, dtype=torch.int32)
    src_rank = torch.full((per, cap), -1, dtype=torch.int32)
    layout_range = torch.zeros(per, ranks, dtype=torch.int64)
    for le in range(per):
        pos = 0
        for src in range(ranks):
            rows = ((r_expert == le) & (r_src == src)).nonzero().flatten()  # arrived in token order
            if isinstance(recv, tuple):
                recv[0][le, pos:pos + len(rows)], recv[1][le, pos:pos + len(rows)] = _rows(payload, rows)
            else:
                recv[le, pos:pos + len(rows)] = payload[rows]
            src_info[le, pos:pos + len(rows)] = r_token[rows].int()
            src_rank[le, pos:pos + len(rows)] = src
            layout_range[le, src] = (pos << 32) | len(rows)
            pos += len(rows)
        count[le] = pos
    return LowLatencyReceived(recv, count, {"src_info": src_info, "layout_range": layout_range, "src_rank": src_rank})


def low_latency_combine_dist(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: dict,
                             group=None) -> torch.Tensor:
    """`low_latency_combine` as a collective: x (E/R, max * R, hidden) this rank's expert outputs."""
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    per = x.shape[0]
    le, slot = (handle["src_rank"] >= 0).nonzero(as_tuple=True)
    src = handle["src_rank"][le, slot].long()
    order = torch.argsort(src * x.shape[0] * x.shape[1] + le * x.shape[1] + slot)
    le, slot, src = le[order], slot[order], src[order]
    in_sizes = torch.bincount(src, minlength=ranks).tolist()
    out_sizes = _sizes(in_sizes, group)
    values = _all_to_all(x[le, slot], out_sizes, in_sizes, group)
    tokens = _all_to_all(handle["src_info"][le, slot].long(), out_sizes, in_sizes, group)
    experts = _all_to_all(le + rank * per, out_sizes, in_sizes, group)
    n, k = topk_idx.shape
    rows = x.new_zeros(n, k, x.shape[2])
    for row in range(values.shape[0]):
        t, e = int(tokens[row]), int(experts[row])
        j = int((topk_idx[t] == e).nonzero()[0])
        rows[t, j] = values[row]
    return _weighted_sum(rows, topk_weights, x.dtype)


def per_token_fp8(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 payload of x (n, hidden): E4M3 values and (n, hidden / 128) scales."""
    return _payload(x, True, round_scale)


def dequantize_payload(x: Payload) -> torch.Tensor:
    """A payload in float32: FP8 values times their 1 x 128 scales."""
    if not isinstance(x, tuple):
        return x.float()
    values, scales = x
    tiles = rearrange(values.float(), "... (kb i) -> ... kb i", i=BLOCK) * scales[..., None]
    return rearrange(tiles, "... kb i -> ... (kb i)")
