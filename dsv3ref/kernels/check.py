"""Check your kernel against the reference: `python -m dsv3ref.kernels.check MODULE:FUNC --op OP`.

MODULE:FUNC names your function (imported from MODULE, which must be importable: your package, or a
file on PYTHONPATH), with the interface of the library op it replaces:

    --op mla_decode           FlashMLA flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                              tile_scheduler_metadata, num_splits, softmax_scale=, causal=) -> (out, lse)
    --op fp8_gemm             DeepGEMM fp8_gemm_nt((a, sfa), (b, sfb), d): writes d
    --op grouped_contiguous   DeepGEMM m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, m_indices)
    --op grouped_masked       DeepGEMM m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), d, masked_m, expected_m)

Every case is built on the CPU from a seed, given to your function on --device in the library's
dtypes and layouts (bf16 queries and pages; E4M3 operands with float32 scales, sfa MN-major and
TMA-aligned; d in bf16), and compared, in float64, with the reference computed exactly from the same
inputs. Each case prints its largest error next to the tolerance it must meet:

- mla_decode out: 2^-7 * max|v| (probabilities rounded to bf16 before P.V err by at most 2^-9 of
  sum p|v| <= max|v|, the bf16 output by 2^-9 |out|; twice their sum, for the online softmax's
  rescaling). lse: 576 * 2^-24 * scale * max sum_d |q_d k_d| (float32 dot products) + 2^-20 (1 + |lse|).
  A query with no key must give out = 0 and lse = +inf exactly.
- GEMMs, per element: 2^-8 |ref| (the bf16 output, half an ulp is 2^-9) + 2^-12 sum_k |a_k b_k|
  (tensor cores accumulate FP8 products with about 14 mantissa bits within each 128-wide K block,
  promoted to float32 between blocks: report section 3.3.2). Only the rows the op defines are
  compared (not padding rows, not rows past masked_m).

The shapes are DeepSeek-V3's (h_q 128 and 16, a TP8 rank's share; head dim 576 and 512; the GEMM sizes
of its projections and experts, M with tails) with --shapes v3 (the default on a GPU); --shapes small
keeps the same edge cases at sizes a CPU runs in seconds (the default on a CPU). Exit status 1 if a
case fails.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv3ref.fp8 import BLOCK, mn_major_tma_aligned, quantize_activation, quantize_weight
from dsv3ref.kernels.gemm import (
    contiguous_layout,
    fp8_gemm_nt,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from dsv3ref.kernels.mla_decode import PAGE_BLOCK_SIZE, flash_mla_with_kvcache

OPS = ("mla_decode", "fp8_gemm", "grouped_contiguous", "grouped_masked")
V3_SOFTMAX_SCALE = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2
"""DeepSeek-V3's attention scale: 1/sqrt(qk_head_dim = 192) times YaRN's mscale(40, 1)^2."""


@dataclass
class Result:
    case: str
    error: float
    tolerance: float
    ok: bool
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"{mark} {self.case:58s} max err {self.error:10.3e}  tolerance {self.tolerance:10.3e}  {self.detail}"


def _worst(found: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, label: str,
           where: torch.Tensor | None = None) -> tuple[float, float, str]:
    """(largest error, the tolerance there, and where an error exceeds its tolerance most), over the
    elements `where` selects (all by default); the place is given as an index of the whole tensor."""
    err = (found.double() - expected.double()).abs().nan_to_num(nan=float("inf"), posinf=float("inf"))
    if where is None:
        where = torch.ones_like(err, dtype=torch.bool)
    err = torch.where(where, err, 0.0)
    ratio = torch.where(where, err / tol, -1.0).nan_to_num(nan=0.0)  # 0 / 0: an exact zero
    i = int(ratio.flatten().argmax())
    index = [int(v) for v in torch.unravel_index(torch.tensor(i), err.shape)]
    detail = ""
    if bool((ratio > 1).any()):
        detail = f"{label}{index}: expected {float(expected.flatten()[i]):.6g}, found {float(found.flatten()[i]):.6g}"
    return float(err.flatten()[i]), float(tol.flatten()[i]), detail


# -------------------------------------------------------------------------------------------- mla_decode
def mla_cases(shapes: str) -> list[dict]:
    """(name, b, s_q, h_q, seqlens, causal, pool) for the sweep; pool: extra pages, shuffled."""
    big = shapes == "v3"
    cases = [
        ("one position", 1, [1], False),
        ("boundary inside a page: 63, 64, 65, 127, 129", 1, [63, 64, 65, 127, 129], False),
        ("whole pages only: 64, 128", 1, [64, 128], False),
        ("an empty row beside a full one", 1, [0, 70], False),
        ("s_q=2 causal, lengths 2, 65, 130", 2, [2, 65, 130], True),
        ("s_q=2 causal, length 1: first query sees nothing", 2, [1, 64], True),
        ("s_q=2 not causal", 2, [65, 200], False),
        ("long rows", 1, [4096, 1000] if big else [700, 300], False),
    ]
    out = []
    for heads in ((128, 16) if big else (16,)):
        out += [dict(name=f"h_q={heads} {name}", s_q=s_q, h_q=heads, seqlens=lens, causal=causal)
                for name, s_q, lens, causal in cases]
    return out


def mla_inputs(case: dict, seed: int, d: int = 576, dv: int = 512) -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = case["seqlens"]
    pages = [math.ceil(n / PAGE_BLOCK_SIZE) for n in lens]
    width = max(max(pages), 1) + 1  # one unused entry more than the longest row
    pool = sum(pages) + 3  # pages no row uses, at random places in the pool
    order = torch.randperm(pool, generator=g)
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    used = 0
    for row, n in enumerate(pages):
        table[row, :n] = order[used:used + n].int()
        used += n
    return dict(q=torch.randn(len(lens), case["s_q"], case["h_q"], d, generator=g).bfloat16(),
                k_cache=torch.randn(pool, PAGE_BLOCK_SIZE, 1, d, generator=g).bfloat16(),
                block_table=table, cache_seqlens=torch.tensor(lens, dtype=torch.int32), head_dim_v=dv,
                softmax_scale=V3_SOFTMAX_SCALE, causal=case["causal"])


def check_mla(fn: Callable, device: str, shapes: str) -> list[Result]:
    results = []
    for i, case in enumerate(mla_cases(shapes)):
        x = mla_inputs(case, seed=i)
        ref_out, ref_lse = flash_mla_with_kvcache(**x, compute_dtype=torch.float64)
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
        try:
            out, lse = fn(moved["q"], moved["k_cache"], moved["block_table"], moved["cache_seqlens"], x["head_dim_v"],
                          None, None, softmax_scale=x["softmax_scale"], causal=x["causal"])
            out, lse = out.cpu(), lse.cpu()
        except Exception as e:  # a kernel that refuses a case fails it, with its message
            results.append(Result(case["name"], float("inf"), 0.0, False, f"raised {type(e).__name__}: {e}"))
            continue
        if tuple(out.shape) != tuple(ref_out.shape) or tuple(lse.shape) != tuple(ref_lse.shape):
            results.append(Result(case["name"], float("inf"), 0.0, False, f"shapes out {tuple(out.shape)}, lse "
                                  f"{tuple(lse.shape)}; expected {tuple(ref_out.shape)}, {tuple(ref_lse.shape)}"))
            continue
        lonely = ref_lse == float("inf")  # (b, h, s_q)
        lonely_out = lonely.permute(0, 2, 1)[..., None].expand_as(ref_out)
        exact = bool((lse[lonely] == float("inf")).all()) and bool((out[lonely_out] == 0).all())
        if bool(lonely.any()) and not exact:
            results.append(Result(case["name"], float("inf"), 0.0, False,
                                  "a query with no key must give out = 0 and lse = +inf exactly"))
            continue
        v_max = x["k_cache"][..., : x["head_dim_v"]].double().abs().max()
        out_tol = torch.full_like(ref_out, float(2 ** -7 * v_max)).double()
        qk = torch.einsum("bthd,bshd->bhts", x["q"].double().abs(),
                          _pages(x).double().abs().expand(-1, -1, x["q"].shape[2], -1)).amax()
        lse_tol = 576 * 2 ** -24 * x["softmax_scale"] * float(qk) + 2 ** -20 * (1 + ref_lse.abs())
        e1, t1, d1 = _worst(out, ref_out, out_tol, "out", ~lonely_out)
        e2, t2, d2 = _worst(lse, ref_lse.nan_to_num(posinf=0.0), lse_tol, "lse", ~lonely)
        results.append(Result(case["name"] + " (out)", e1, t1, e1 <= t1, d1))
        results.append(Result(case["name"] + " (lse)", e2, t2, e2 <= t2, d2))
    return results


def _pages(x: dict) -> torch.Tensor:
    from_pages = x["k_cache"][x["block_table"].clamp(min=0).long()]  # (b, nb, page, 1, d)
    return from_pages.flatten(1, 2)  # (b, s, 1, d)


# ---------------------------------------------------------------------------------------------- GEMMs
GEMM_SHAPES = {
    "v3": [("q_a_proj", 1536, 7168), ("kv_a_proj_with_mqa", 576, 7168), ("q_b_proj", 24576, 1536),
           ("kv_b_proj", 32768, 512), ("o_proj", 7168, 16384), ("expert gate+up", 4096, 7168),
           ("expert down", 7168, 2048)],
    "small": [("N tail (576-like)", 320, 384), ("K of one block", 256, 128), ("square", 256, 256)],
}


def _fp8_operands(m: int, n: int, k: int, g: torch.Generator, groups: int | None = None):
    a = torch.randn(m, k, generator=g)
    a_q, sfa = quantize_activation(a)
    if groups is None:
        b_q, sfb = quantize_weight(torch.randn(n, k, generator=g) * 0.05)
    else:
        pairs = [quantize_weight(torch.randn(n, k, generator=g) * 0.05) for _ in range(groups)]
        b_q, sfb = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return a_q, sfa, b_q, sfb


def _gemm_tol(a_q, sfa, b_q, sfb, ref) -> torch.Tensor:
    """2^-8 |ref| + 2^-12 sum_k |a_k b_k|, with a, b dequantized."""
    a = (a_q.double().unflatten(-1, (-1, BLOCK)) * sfa.double()[..., None]).flatten(-2)
    rows = sfb.double().repeat_interleave(BLOCK, dim=0)[: b_q.shape[0]]
    b = (b_q.double().unflatten(-1, (-1, BLOCK)) * rows[..., None]).flatten(-2)
    return 2 ** -8 * ref.double().abs() + 2 ** -12 * (a.abs() @ b.abs().T)


def _run(results: list[Result], name: str, fn: Callable, args: tuple, d: torch.Tensor, ref: torch.Tensor,
         tol: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """fn(*args), which writes d; d's rows (all, or `rows`) against ref within tol."""
    try:
        fn(*args)
        got = d.cpu()
    except Exception as e:
        results.append(Result(name, float("inf"), 0.0, False, f"raised {type(e).__name__}: {e}"))
        return
    where = None
    if rows is not None:  # the rows the op defines: a list of row indices, or a mask
        where = rows[..., None].expand(ref.shape) if rows.dtype == torch.bool else torch.zeros(
            ref.shape, dtype=torch.bool).index_fill_(0, rows, True)
    err, t, detail = _worst(got, ref.nan_to_num(), tol.nan_to_num(nan=1.0), "d", where)
    results.append(Result(name, err, t, err <= t, detail))


def check_fp8_gemm(fn: Callable, device: str, shapes: str) -> list[Result]:
    results = []
    ms = (1, 2, 128, 200) if shapes == "v3" else (1, 2, 130)
    for i, (label, n, k) in enumerate(GEMM_SHAPES[shapes]):
        for m in ms:
            g = torch.Generator().manual_seed(1000 + 10 * i + m)
            a_q, sfa, b_q, sfb = _fp8_operands(m, n, k, g)
            ref = fp8_gemm_nt((a_q, sfa), (b_q, sfb), torch.empty(m, n, dtype=torch.float64),
                              accumulate=torch.float64)
            d = torch.empty(m, n, dtype=torch.bfloat16, device=device)
            operands = ((a_q.to(device), mn_major_tma_aligned(sfa.to(device))), (b_q.to(device), sfb.to(device)))
            _run(results, f"{label} M={m} N={n} K={k}", fn, (*operands, d), d, ref, _gemm_tol(a_q, sfa, b_q, sfb, ref))
    return results


def _grouped_shapes(shapes: str) -> tuple[int, int, list[int]]:
    if shapes == "v3":
        return 4096, 7168, [300, 0, 128, 1, 257, 64, 0, 500]  # 8 local experts of a 32-way EP rank
    return 320, 256, [100, 0, 128, 1, 130]


def check_grouped_contiguous(fn: Callable, device: str, shapes: str) -> list[Result]:
    n, k, counts = _grouped_shapes(shapes)
    results = []
    for seed, label in ((0, "experts of uneven counts, empty ones"), (1, "same, another draw")):
        g = torch.Generator().manual_seed(2000 + seed)
        m_indices, rows = contiguous_layout(counts)
        a_q, sfa, b_q, sfb = _fp8_operands(len(m_indices), n, k, g, groups=len(counts))
        # padding rows zero (E4M3's zero byte), as DeepGEMM's tests lay them out
        a_q = a_q.view(torch.uint8).masked_fill((m_indices < 0)[:, None], 0).view(a_q.dtype)
        ref = m_grouped_fp8_gemm_nt_contiguous((a_q, sfa), (b_q, sfb), torch.empty(len(m_indices), n,
                                               dtype=torch.float64), m_indices, accumulate=torch.float64)
        tol = torch.cat([_gemm_tol(a_q[r:r + 1], sfa[r:r + 1], b_q[max(int(e), 0)], sfb[max(int(e), 0)], ref[r:r + 1])
                         for r, e in enumerate(m_indices)])
        d = torch.empty(len(m_indices), n, dtype=torch.bfloat16, device=device)
        operands = ((a_q.to(device), mn_major_tma_aligned(sfa.to(device))), (b_q.to(device), sfb.to(device)))
        _run(results, f"{label}: counts {counts} N={n} K={k}", fn, (*operands, d, m_indices.to(device)), d, ref,
             tol, rows)
    return results


def check_grouped_masked(fn: Callable, device: str, shapes: str) -> list[Result]:
    n, k, counts = _grouped_shapes(shapes)
    m_max = max(counts) + 3
    results = []
    for seed in range(2):
        g = torch.Generator().manual_seed(3000 + seed)
        groups = len(counts)
        pairs = [_fp8_operands(m_max, n, k, g) for _ in range(groups)]
        a_q, sfa = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        b_q, sfb = torch.stack([p[2] for p in pairs]), torch.stack([p[3] for p in pairs])
        masked_m = torch.tensor(counts, dtype=torch.int32)
        ref = torch.full((groups, m_max, n), float("nan"), dtype=torch.float64)
        m_grouped_fp8_gemm_nt_masked((a_q, sfa), (b_q, sfb), ref, masked_m, m_max, accumulate=torch.float64)
        tol = torch.stack([_gemm_tol(a_q[e], sfa[e], b_q[e], sfb[e], ref[e].nan_to_num()) for e in range(groups)])
        valid = torch.arange(m_max)[None, :] < masked_m[:, None]  # (groups, m_max)
        d = torch.full((groups, m_max, n), float("nan"), dtype=torch.bfloat16, device=device)
        operands = ((a_q.to(device), mn_major_tma_aligned(sfa.to(device))), (b_q.to(device), sfb.to(device)))
        _run(results, f"draw {seed}: masked_m {counts} of M_max={m_max} N={n} K={k}", fn,
             (*operands, d, masked_m.to(device), int(masked_m.float().mean())), d, ref, tol, valid)
    return results


CHECKS = {"mla_decode": check_mla, "fp8_gemm": check_fp8_gemm, "grouped_contiguous": check_grouped_contiguous,
          "grouped_masked": check_grouped_masked}


def run_check(fn: Callable, op: str, device: str = "cpu", shapes: str | None = None) -> list[Result]:
    """The sweep of `op` against fn; shapes "v3" or "small" (default: v3 on a GPU, small on a CPU)."""
    if op not in CHECKS:
        raise ValueError(f"op: found {op!r}, expected one of {OPS}")
    shapes = shapes or ("small" if torch.device(device).type == "cpu" else "v3")
    with torch.no_grad():
        return CHECKS[op](fn, device, shapes)


def load_function(spec: str) -> Callable:
    """MODULE:FUNC -> the function."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"function: expected MODULE:FUNC (e.g. mykernels.mla:decode), found {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"function: cannot load {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"function: {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv3ref.kernels.check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("function", help="MODULE:FUNC, your op")
    parser.add_argument("--op", required=True, choices=OPS)
    parser.add_argument("--device", default="cpu", help="where your function runs (default cpu)")
    parser.add_argument("--shapes", choices=("v3", "small"), help="DeepSeek-V3's sizes or small ones "
                        "(default: v3 on a GPU, small on a CPU)")
    args = parser.parse_args(argv)
    try:
        fn = load_function(args.function)
    except ValueError as e:
        parser.error(str(e))
    results = run_check(fn, args.op, args.device, args.shapes)
    for r in results:
        print(r.line())
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} of {len(results)} cases pass" + (f"; {failed} fail" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
