"""Exercises a learner writes, and checkers that say where an answer first differs.

Five exercises, each a function the learner writes in a notebook of `notebooks/exercises/`, beside
the lesson it practises:

=====================  ===========================================  ==========================
checker                the learner writes                           lesson
=====================  ===========================================  ==========================
check_absorbed_attention  one decode step of absorbed MLA against   02_mla
                       the latent cache
check_routing          group-limited sigmoid top-k with the bias    03_routing
check_bug_hunt         a diagnosis of a model with a planted bug,   04_oracle
                       found with `dsv3ref.trace` and `compare`
check_mtp_combine      the MTP module's combine step (eq. 21)       05_mtp
check_quantization     128x128 weight blocks and 1x128 activation   06_fp8
                       tiles in E4M3
=====================  ===========================================  ==========================

Each checker calls the learner's function on random inputs and on hidden edge cases (ties in the
router, rows of the cache at different lengths with stale values past their end, a block or tile
cut short by a size that is not a multiple of 128, a zero block, no tokens at all), compares every
output with a reference written here in float64 from the report's equations, and returns a
`Verdict`: passed, or the first case, output and index where the answer differs, the expected and
the found value, and, where the wrong value matches a mistake implementers make (the bias left out
of the choice, the new token left out of the cache, the two halves of the MTP input swapped), that
mistake by name. A function that still raises NotImplementedError is "not written yet", not wrong.

    from dsv3ref import exercises
    print(exercises.check_routing(route))      # the Verdict's message
    verdict.inputs                             # the failing case's inputs, to run it by hand

Reference solutions are kept out of the learner's way, in `notebooks/exercises/solutions.py`;
tests/test_exercises.py checks that each passes and that planted wrong answers get a useful message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from dsv3ref import planted_bugs
from dsv3ref.config import ModelConfig
from dsv3ref.fp8 import AMAX_FLOOR, BLOCK, E4M3, E4M3_MAX
from dsv3ref.model import DeepseekV3
from dsv3ref.oracle import compare, trace


@dataclass
class Verdict:
    """What a checker found. Truthy when the answer passed; print it for the message."""

    exercise: str
    passed: bool
    message: str
    written: bool = True
    """False while the function still raises NotImplementedError."""
    case: str | None = None
    """The first case that failed."""
    inputs: dict = field(default_factory=dict, repr=False)
    """That case's inputs, as the function received them (keyword arguments)."""

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"Verdict({self.exercise!r}, passed={self.passed}): {self.message}"


class _Fail(Exception):
    """A difference found in one case: its message says where."""


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _index(idx: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(i) for i in idx) + "]"


def _same_shape(name: str, got: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise _Fail(f"output {name}: expected a tensor of shape {shape}, got {type(got).__name__}")
    if tuple(got.shape) != tuple(shape):
        raise _Fail(f"output {name}: expected shape {tuple(shape)}, got {tuple(got.shape)}")
    return got


def first_difference(name: str, expected: torch.Tensor, got: object, rtol: float = 1e-9,
                     atol: float = 0.0) -> str | None:
    """Where `got` first differs from `expected` (row-major order), or None. An element differs when
    |got - expected| > atol + rtol * max |expected| (the error relative to the tensor's scale, as
    `dsv3ref.compare` counts it); NaN differs from everything."""
    try:
        got = _same_shape(name, got, tuple(expected.shape))
    except _Fail as e:
        return str(e)
    if got.is_floating_point() != expected.is_floating_point():
        return f"output {name}: expected a {expected.dtype} tensor, got {got.dtype}"
    if expected.numel() == 0:
        return None
    e, g = expected.double(), got.detach().double()
    limit = atol + rtol * float(e.abs().max())
    bad = ~((g - e).abs() <= limit)  # NaN compares False, so it is bad
    if not bool(bad.any()):
        return None
    idx = tuple(int(i) for i in bad.nonzero()[0])
    n = int(bad.sum())
    message = (f"output {name}{_index(idx)}: expected {float(e[idx]):.10g}, got {float(g[idx]):.10g} "
               f"({n} of {e.numel()} elements differ; tolerance {limit:.3g})")
    if expected.dtype == torch.float64 and got.dtype != torch.float64 and float((g - e).abs().max()) <= 1e-5 * float(
            e.abs().max()):
        message += (f"; your output is {got.dtype} and agrees to its precision: the inputs are float64, compute in "
                    "their dtype")
    return message


def _call(fn: Callable, kwargs: dict):
    return fn(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})


def _run_cases(exercise: str, fn_names: str, cases: list[tuple[str, dict]], judge: Callable[[str, dict], None]
               ) -> Verdict:
    """Run every case through judge(case, inputs), which calls the learner's code and raises _Fail."""
    for number, (case, inputs) in enumerate(cases, 1):
        try:
            judge(case, inputs)
        except NotImplementedError:
            return Verdict(exercise, False, f"{exercise}: not written yet ({fn_names} raises NotImplementedError: "
                           "replace its body with your code, then run this cell again)", written=False)
        except _Fail as e:
            return Verdict(exercise, False, f"{exercise}: case {number} of {len(cases)} ({case}) differs: {e}",
                           case=case, inputs=inputs)
        except Exception as e:  # the learner's code raised: say which case, keep the inputs to rerun it
            return Verdict(exercise, False, f"{exercise}: case {number} of {len(cases)} ({case}): your code raised "
                           f"{type(e).__name__}: {e}", case=case, inputs=inputs)
    return Verdict(exercise, True, f"{exercise}: passed all {len(cases)} cases ({'; '.join(c for c, _ in cases)})")


# ---------------------------------------------------------------------------------------------------
# 1. Routing (lesson 03): group-limited sigmoid top-k with the auxiliary-loss-free bias


def reference_route(scores: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int, top_k: int,
                    scaling: float, *, group_rule: str = "top2", use_bias: bool = True, groups: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The report's routing written out token by token (eqs. 13-16 and the group limit): ids (T, top_k)
    best first, ties to the lower index; weights from the unbiased scores, normalized, times scaling.
    The keyword switches build the mistakes the checker recognizes."""
    t, e = scores.shape
    biased = scores + bias if (use_bias and bias is not None) else scores.clone()
    ids = torch.empty(t, top_k, dtype=torch.long)
    for row in range(t):
        b = biased[row].tolist()
        eligible = list(range(e))
        if groups and n_group > 1:
            size = e // n_group
            members = [list(range(g * size, (g + 1) * size)) for g in range(n_group)]
            if group_rule == "top2":
                score = [sum(sorted((b[i] for i in m), reverse=True)[:2]) for m in members]
            else:  # "max": DeepSeek-V2's group_limited_greedy
                score = [max(b[i] for i in m) for m in members]
            kept = sorted(range(n_group), key=lambda g: (-score[g], g))[:topk_group]
            eligible = [i for g in sorted(kept) for i in members[g]]
        ids[row] = torch.tensor(sorted(eligible, key=lambda i: (-b[i], i))[:top_k])
    chosen = scores.gather(1, ids)
    weights = chosen / chosen.sum(-1, keepdim=True) * scaling if t else chosen
    return ids, weights


def _valid_tie(scores, bias, n_group, topk_group, got: list[int]) -> bool:
    """Whether `got` is a correct choice for one token when exact ties make several choices correct: some
    set of topk_group best groups (by the sum of each group's two best biased scores) holds every
    chosen expert, and no expert of those groups left out has a higher biased score than one chosen."""
    e = scores.shape[-1]
    b = (scores + bias).tolist()
    size = e // n_group
    group_of = [i // size for i in range(e)]
    if n_group == 1:
        kept = {0}
    else:
        score = [sum(sorted(b[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kth = sorted(score, reverse=True)[topk_group - 1]
        kept = {g for g in range(n_group) if score[g] > kth} | {group_of[i] for i in got}
        if len(kept) > topk_group or any(score[g] < kth for g in kept):
            return False
        tied = sorted((g for g in range(n_group) if score[g] == kth and g not in kept),
                      key=lambda g: max(b[g * size:(g + 1) * size]))
        kept |= set(tied[:topk_group - len(kept)])  # the tied groups that compete least with the choice
    left_out = [b[i] for i in range(e) if group_of[i] in kept and i not in got]
    return not left_out or min(b[i] for i in got) >= max(left_out)


def _routing_cases() -> list[tuple[str, dict]]:
    g = torch.Generator().manual_seed(3)

    def make(t, e, n_group, topk_group, top_k, bias_std, quantized=False):
        if quantized:  # scores and bias on a coarse grid: many exact ties
            scores = torch.randint(1, 4, (t, e), generator=g).double() / 4
            bias = torch.randint(-1, 2, (e,), generator=g).double() / 4
        else:
            scores = torch.sigmoid(torch.randn(t, e, generator=g, dtype=torch.float64))
            bias = bias_std * torch.randn(e, generator=g, dtype=torch.float64)
        return dict(scores=scores, bias=bias, n_group=n_group, topk_group=topk_group, top_k=top_k, scaling=2.5)

    return [("DeepSeek-V3's shape: 256 experts, 8 groups, 4 kept, top-8, 24 tokens", make(24, 256, 8, 4, 8, 0.02)),
            ("zero bias", {**make(16, 64, 8, 4, 8, 0.0)}),
            ("a bias large enough to change the choice", make(16, 64, 8, 4, 6, 0.5)),
            ("exact ties between experts and between groups", make(24, 16, 4, 2, 4, 0.0, quantized=True)),
            ("one group (no group limit)", make(8, 32, 1, 1, 4, 0.1)),
            ("one token", make(1, 64, 8, 4, 8, 0.1)),
            ("no tokens", make(0, 64, 8, 4, 8, 0.1))]


def _routing_judge(route: Callable) -> Callable[[str, dict], None]:
    def judge(case: str, x: dict) -> None:
        out = _call(route, x)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise _Fail(f"expected (ids, weights), got {type(out).__name__}")
        ids, weights = out
        t, k = x["scores"].shape[0], x["top_k"]
        _same_shape("ids", ids, (t, k))
        _same_shape("weights", weights, (t, k))
        if ids.is_floating_point():
            raise _Fail(f"output ids: expected integer expert ids, got {ids.dtype}")
        ref_ids, _ = reference_route(x["scores"], x["bias"], x["n_group"], x["topk_group"], k, x["scaling"])
        mistakes = {
            "it is the choice without the bias (choose by s + b, eq. 16; the bias only chooses)":
                dict(use_bias=False),
            "it is the choice without the group limit (keep only the topk_group best groups)": dict(groups=False),
            "it ranks groups by their best expert; DeepSeek-V3 ranks them by the sum of their two best biased "
            "scores": dict(group_rule="max")}
        for row in range(t):
            got = [int(i) for i in ids[row]]
            want = ref_ids[row].tolist()
            if len(set(got)) != k:
                raise _Fail(f"output ids{_index((row,))}: {got} names an expert twice")
            if set(got) == set(want) or _valid_tie(x["scores"][row], x["bias"], x["n_group"], x["topk_group"], got):
                continue
            wrong = next(i for i in got if i not in want)
            b = x["scores"][row] + x["bias"]
            note = f"expert {wrong} (biased score {_fmt(float(b[wrong]))}) is not among the best"
            for hint, kw in mistakes.items():
                alt, _ = reference_route(x["scores"][row:row + 1], x["bias"], x["n_group"], x["topk_group"], k,
                                         x["scaling"], **kw)
                if set(alt[0].tolist()) == set(got):
                    note = hint
                    break
            raise _Fail(f"output ids{_index((row,))}: expected experts {sorted(want)} (in any order), got "
                        f"{sorted(got)}: {note}")
        # the weights of the experts chosen (whichever of tied choices it is), aligned to the answer's order
        s = x["scores"].gather(1, ids.long())
        expected = s / s.sum(-1, keepdim=True) * x["scaling"] if t else s
        diff = first_difference("weights", expected, weights)
        if diff:
            biased = s + x["bias"][ids.long()]
            variants = {"the weights use the biased scores; the bias chooses but never weighs (eq. 13)":
                        biased / biased.sum(-1, keepdim=True) * x["scaling"],
                        "routed_scaling_factor is missing": s / s.sum(-1, keepdim=True),
                        "the weights are not normalized to sum to one before scaling": s * x["scaling"],
                        "softmax is DeepSeek-V2's; V3 normalizes the chosen sigmoid scores by their sum":
                        torch.softmax(s, -1) * x["scaling"]}
            hint = next((h for h, v in variants.items() if first_difference("w", v, weights) is None), None)
            raise _Fail(diff + (f": {hint}" if hint else ""))
    return judge


def check_routing(route: Callable) -> Verdict:
    """Check route(scores, bias, n_group, topk_group, top_k, scaling) -> (ids (T, top_k), weights (T, top_k)):
    scores are the sigmoid affinities s_{i,t} (T, E) in float64, bias the balancing bias b_i (E,). Any
    order of a token's experts is accepted, and any of several choices that exact ties make equally good."""
    return _run_cases("routing", "route", _routing_cases(), _routing_judge(route))


# ---------------------------------------------------------------------------------------------------
# 2. Absorbed attention (lesson 02): one decode step against the latent cache


def reference_attention(q_nope, q_rope, c_kv, k_rope, lengths, w_kv_b, softmax_scale, *, extra: int = 0,
                        rope: bool = True, scale: bool = True) -> torch.Tensor:
    """Naive MLA for one new token per row, keys and values expanded from the latent (float64):
    out[b, h] = sum_{s < lengths[b]} softmax_s((q_nope . W_UK c_s + q_rope . k_rope_s) * scale) W_UV c_s.
    The keyword switches build the mistakes the checker recognizes."""
    b_, h, dn = q_nope.shape
    dv = w_kv_b.shape[0] // h - dn
    w = w_kv_b.double().reshape(h, dn + dv, -1)
    w_uk, w_uv = w[:, :dn], w[:, dn:]
    out = torch.zeros(b_, h, dv, dtype=torch.float64)
    for b in range(b_):
        n = min(max(int(lengths[b]) + extra, 0), c_kv.shape[1])
        c = c_kv[b, :n].double()
        k = torch.einsum("hdr,sr->shd", w_uk, c)  # (n, h, dn): every key expanded
        v = torch.einsum("hdr,sr->shd", w_uv, c)
        s = torch.einsum("hd,shd->hs", q_nope[b].double(), k)
        if rope:
            s = s + torch.einsum("hd,sd->hs", q_rope[b].double(), k_rope[b, :n].double())
        p = torch.softmax(s * (softmax_scale if scale else 1.0), dim=-1)
        out[b] = torch.einsum("hs,shd->hd", p, v)
    return out


def _attention_cases() -> list[tuple[str, dict]]:
    g = torch.Generator().manual_seed(2)

    def make(lengths, s, h=4, dn=16, dr=8, dv=12, r=20):
        b = len(lengths)
        lengths = torch.tensor(lengths)
        c_kv = torch.randn(b, s, r, generator=g, dtype=torch.float64)
        k_rope = torch.randn(b, s, dr, generator=g, dtype=torch.float64)
        stale = torch.arange(s)[None, :] >= lengths[:, None]  # past each row's end: values of an older sequence
        c_kv[stale] = 30 * torch.randn(int(stale.sum()), r, generator=g, dtype=torch.float64)
        k_rope[stale] = 30 * torch.randn(int(stale.sum()), dr, generator=g, dtype=torch.float64)
        return dict(q_nope=torch.randn(b, h, dn, generator=g, dtype=torch.float64),
                    q_rope=torch.randn(b, h, dr, generator=g, dtype=torch.float64), c_kv=c_kv, k_rope=k_rope,
                    lengths=lengths, w_kv_b=torch.randn(h * (dn + dv), r, generator=g, dtype=torch.float64) / r ** 0.5,
                    softmax_scale=(dn + dr) ** -0.5)

    return [("one row, the cache full", make([9], 9)),
            ("rows of different lengths, stale values past each row's end", make([3, 9, 1, 6], 12)),
            ("a cache of one position: the new token alone", make([1, 1], 4)),
            ("DeepSeek-V3's head shapes (128 + 64 query, 128 value, 512 latent), 4 heads",
             make([5, 17], 20, h=4, dn=128, dr=64, dv=128, r=512))]


def _attention_judge(fn: Callable) -> Callable[[str, dict], None]:
    def judge(case: str, x: dict) -> None:
        got = _call(fn, x)
        expected = reference_attention(**x)
        diff = first_difference("out", expected, got, rtol=1e-9)
        if not diff:
            return
        mistakes = {
            "it equals attention over one position fewer: the new token's own latent, at lengths[b] - 1, is part "
            "of the cache it attends to": dict(extra=-1),
            "it equals attention over one position more: positions >= lengths[b] hold stale values": dict(extra=1),
            "it equals attention over the whole cache: mask (or slice) each row at its length":
                dict(extra=10**9),
            "it equals attention without the rotary half: add q_rope . k_rope to the scores": dict(rope=False),
            "it equals attention without softmax_scale": dict(scale=False)}
        for hint, kw in mistakes.items():
            alt = reference_attention(**x, **kw)
            if alt.shape == got.shape and first_difference("out", alt, got, rtol=1e-9) is None:
                raise _Fail(f"{diff}: {hint}")
        if "your output is" in diff:
            raise _Fail(diff)
        raise _Fail(diff + ". kv_b_proj's rows are head-major: head h's qk_nope_head_dim key rows (W_UK), then "
                    "its v_head_dim value rows (W_UV)")
    return judge


def check_absorbed_attention(absorbed_attention: Callable) -> Verdict:
    """Check absorbed_attention(q_nope, q_rope, c_kv, k_rope, lengths, w_kv_b, softmax_scale) -> out (B, H, dv):
    one decode step per row b, whose cache holds lengths[b] positions (the new token's last)."""
    return _run_cases("absorbed attention", "absorbed_attention", _attention_cases(), _attention_judge(
        absorbed_attention))


# ---------------------------------------------------------------------------------------------------
# 3. The MTP module's combine step (lesson 05, eq. 21)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def reference_mtp_combine(hidden, tokens, embedding, enorm_weight, hnorm_weight, eh_proj, eps, *,
                          swapped: bool = False, shift: int = 1, norms_swapped: bool = False,
                          no_eps: bool = False) -> torch.Tensor:
    """h'_i = eh_proj [RMSNorm_e(Emb(t_{i+1})); RMSNorm_h(h_i)] for i = 0..T-2, in float64 (the
    checkpoint's order: embedding first). The keyword switches build the mistakes the checker recognizes."""
    t = hidden.shape[0]
    n = max(t - 1, 0)
    ids = tokens[shift:shift + n] if shift >= 0 else tokens[:n]
    e, h = embedding.double()[ids], hidden.double()[:n]
    ew, hw = (hnorm_weight, enorm_weight) if norms_swapped else (enorm_weight, hnorm_weight)
    eps = 0.0 if no_eps else eps
    parts = [_rms(e, ew.double(), eps), _rms(h, hw.double(), eps)]
    if swapped:
        parts.reverse()
    return torch.cat(parts, dim=-1) @ eh_proj.double().T


def _mtp_cases() -> list[tuple[str, dict]]:
    g = torch.Generator().manual_seed(5)

    def make(t, d=16, v=40, zero_row=None):
        hidden = torch.randn(t, d, generator=g, dtype=torch.float64)
        if zero_row is not None:
            hidden[zero_row] = 0.0
        return dict(hidden=hidden, tokens=torch.randint(0, v, (t,), generator=g),
                    embedding=torch.randn(v, d, generator=g, dtype=torch.float64),
                    enorm_weight=1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64),
                    hnorm_weight=1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64),
                    eh_proj=torch.randn(d, 2 * d, generator=g, dtype=torch.float64) / d ** 0.5, eps=1e-6)

    return [("8 positions", make(8)), ("a hidden state of zeros (RMSNorm's eps keeps it finite)", make(5, zero_row=2)),
            ("one position: nothing to predict", make(1)), ("small values, where eps matters", {
                **make(6), "hidden": 1e-4 * torch.randn(6, 16, generator=g, dtype=torch.float64)})]


def _mtp_judge(fn: Callable) -> Callable[[str, dict], None]:
    def judge(case: str, x: dict) -> None:
        got = _call(fn, x)
        diff = first_difference("combined", reference_mtp_combine(**x), got, rtol=1e-9)
        if not diff:
            return
        mistakes = {
            "the two halves are swapped: the checkpoint's eh_proj reads [enorm(embedding); hnorm(hidden)], "
            "embedding first (the report writes the other order)": dict(swapped=True),
            "the embedding is of t_i: position i is combined with the embedding of the next token, t_{i+1}":
                dict(shift=0),
            "enorm and hnorm are exchanged: enorm normalizes the embedding, hnorm the hidden state":
                dict(norms_swapped=True),
            "RMSNorm without eps: x / sqrt(mean(x^2) + eps)": dict(no_eps=True)}
        for hint, kw in mistakes.items():
            alt = reference_mtp_combine(**x, **kw)
            if alt.shape == tuple(getattr(got, "shape", ())) and first_difference("c", alt, got, rtol=1e-9) is None:
                raise _Fail(f"{diff}: {hint}")
        raise _Fail(diff)
    return judge


def check_mtp_combine(mtp_combine: Callable) -> Verdict:
    """Check mtp_combine(hidden, tokens, embedding, enorm_weight, hnorm_weight, eh_proj, eps) -> (T - 1, d):
    row i combines the previous depth's hidden state h_i with the embedding of token t_{i+1}."""
    return _run_cases("MTP combine", "mtp_combine", _mtp_cases(), _mtp_judge(mtp_combine))


# ---------------------------------------------------------------------------------------------------
# 4. Block quantization (lesson 06): 128x128 weight blocks, 1x128 activation tiles, E4M3


def _blocks(shape: tuple[int, ...], index: tuple[int, ...], tile: tuple[int, ...]) -> str:
    return ", ".join(f"{i * b}:{min((i + 1) * b, n)}" if b > 1 else str(i) for i, b, n in zip(index, tile, shape,
                                                                                             strict=True))


def reference_quantize(x: torch.Tensor, tile: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block (the last two axes cut into 128x128 when tile == (128, 128), the last axis into 1x128
    tiles when tile == 128): scale = max(amax, 1e-4) / 448 in float32, q = x / scale rounded to E4M3,
    clamped to +-448. A block cut short by the tensor's end holds only the elements it has."""
    x = x.float()
    if isinstance(tile, int):
        k = x.shape[-1]
        n = math.ceil(k / tile)
        scale = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
        q = torch.empty_like(x, dtype=E4M3)
        for j in range(n):
            part = x[..., j * tile:(j + 1) * tile]
            s = part.abs().amax(-1).clamp(min=AMAX_FLOOR) / E4M3_MAX
            scale[..., j] = s
            q[..., j * tile:(j + 1) * tile] = (part / s[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return q, scale
    rows, cols = x.shape
    br, bc = tile
    scale = torch.empty(math.ceil(rows / br), math.ceil(cols / bc), dtype=torch.float32)
    q = torch.empty_like(x, dtype=E4M3)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            s = part.abs().amax().clamp(min=AMAX_FLOOR) / E4M3_MAX
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (part / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def _quant_cases() -> list[tuple[str, dict]]:
    g = torch.Generator().manual_seed(6)

    def w(rows, cols):
        return torch.randn(rows, cols, generator=g) * torch.logspace(-2, 1, cols)  # columns of different ranges

    zero = w(256, 256)
    zero[128:, :128] = 0.0
    spike = w(128, 256)
    spike[5, 200] = 300.0
    return [("weight 256 x 384, whole blocks", dict(w=w(256, 384))),
            ("weight 300 x 200: blocks cut short at the bottom and the right", dict(w=w(300, 200))),
            ("weight with an all-zero block", dict(w=zero)), ("weight with one large entry", dict(w=spike)),
            ("activation (2, 3, 384): one scale per token per 128 channels", dict(x=w(6, 384).reshape(2, 3, 384))),
            ("activation (5, 300): a tile cut short", dict(x=w(5, 300))),
            ("activation (4, 100): one partial tile", dict(x=w(4, 100)))]


def _quant_judge(quantize_weight: Callable, quantize_activation: Callable) -> Callable[[str, dict], None]:
    def judge(case: str, x: dict) -> None:
        if "w" in x:
            name, fn, tensor, tile = "quantize_weight", quantize_weight, x["w"], (BLOCK, BLOCK)
        else:
            name, fn, tensor, tile = "quantize_activation", quantize_activation, x["x"], BLOCK
        out = _call(fn, x)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise _Fail(f"{name}: expected (q, scale), got {type(out).__name__}")
        q, scale = out
        want_q, want_s = reference_quantize(tensor, tile)
        shape = tuple(want_s.shape)
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != shape:
            found = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
            hint = ""
            if isinstance(scale, torch.Tensor) and len(found) == len(shape) and all(
                    f == s or f == s - 1 for f, s in zip(found, shape, strict=True)):
                hint = ": a block cut short by the tensor's end still gets its scale (ceil, not floor)"
            raise _Fail(f"{name}: scale of shape {found}, expected {shape} (one per "
                        f"{'128 x 128 block' if tile != BLOCK else 'token and 128 channels'}){hint}")
        if scale.dtype != torch.float32:
            raise _Fail(f"{name}: scale is {scale.dtype}, expected torch.float32")
        bad = ~(scale == want_s)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            got_s, exp_s = float(scale[idx]), float(want_s[idx])
            notes = [(abs(got_s * exp_s - 1) < 1e-3, "it is 448 / amax: the scale is amax / 448 "
                      "(x / scale fits E4M3's range, and dequantizing multiplies by it)"),
                     (math.isnan(got_s) or got_s == 0, "an all-zero block: amax is floored at 1e-4 before dividing"),
                     (got_s == float(tensor.abs().amax()) / E4M3_MAX, "one scale for the whole tensor: one per block")]
            note = next((n for cond, n in notes if cond), "")
            where = _blocks(tuple(tensor.shape), idx, tile if tile != BLOCK else (1,) * (len(idx) - 1) + (BLOCK,))
            raise _Fail(f"{name}: scale{_index(idx)} (elements [{where}]): expected {_fmt(exp_s)}, got {_fmt(got_s)}"
                        + (f": {note}" if note else ""))
        if not isinstance(q, torch.Tensor) or q.dtype != E4M3:
            raise _Fail(f"{name}: q should be {E4M3}, got {getattr(q, 'dtype', type(q).__name__)}")
        _same_shape("q", q, tuple(tensor.shape))
        bad = q.view(torch.uint8) != want_q.view(torch.uint8)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            g_, e_ = q[idx].float().item(), want_q[idx].float().item()
            note = ""
            if math.isnan(g_):
                note = ": NaN: clamp x / scale to +-448 before casting (E4M3 has no infinity)"
            elif abs(g_ - e_) <= abs(e_) * 2 ** -3 + 2 ** -9:
                note = (": one step of E4M3 apart: x / scale is rounded to the nearest E4M3 value (torch's "
                        ".to(torch.float8_e4m3fn) does it), computed in float32 with the float32 scale")
            e_byte, g_byte = int(want_q.view(torch.uint8)[idx]), int(q.view(torch.uint8)[idx])
            raise _Fail(f"{name}: q{_index(idx)}: expected {_fmt(e_)} (byte 0x{e_byte:02x}), got {_fmt(g_)} (byte "
                        f"0x{g_byte:02x}); {int(bad.sum())} of {bad.numel()} differ{note}")
    return judge


def check_quantization(quantize_weight: Callable, quantize_activation: Callable) -> Verdict:
    """Check quantize_weight(w (out, in)) -> (q E4M3 (out, in), scale float32 (ceil(out/128), ceil(in/128)))
    and quantize_activation(x (..., K)) -> (q E4M3 (..., K), scale float32 (..., ceil(K/128))), exactly:
    the same scales and the same bytes as the rule in `reference_quantize`."""
    return _run_cases("block quantization", "quantize_weight / quantize_activation", _quant_cases(),
                      _quant_judge(quantize_weight, quantize_activation))


# ---------------------------------------------------------------------------------------------------
# 5. The planted-bug hunt (lesson 04): which bug, where, found with dsv3ref.trace and dsv3ref.compare


def bugs() -> dict[str, Callable]:
    """The bugs a mystery model may carry: name -> planted_bugs context manager. Those taking a layer
    are planted in one MoE layer; the others in every attention layer at once."""
    return {"non_interleaved_rope": planted_bugs.non_interleaved_rope,
            "yarn_without_mscale": planted_bugs.yarn_without_mscale,
            "bias_in_combine_weights": planted_bugs.bias_in_combine_weights,
            "swapped_shared_expert": planted_bugs.swapped_shared_expert}


LAYERED = ("bias_in_combine_weights", "swapped_shared_expert")


def plant(model, answer: tuple[str, int | None] | None):
    """The context manager that plants `answer` = (bug name, layer or None) in `model` (None: no bug)."""
    if answer is None:
        return nullcontext()
    name, layer = answer
    table = bugs()
    if name not in table:
        raise _Fail(f"unknown bug {name!r}; expected one of {sorted(table)} or None")
    if name in LAYERED:
        if not isinstance(layer, int) or not model.config.is_moe_layer(layer):
            moe = [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)]
            raise _Fail(f"{name} needs the MoE layer it is in, one of {moe}; got {layer!r}")
        return table[name](model, layer)
    return table[name](model)


def mystery_model(seed: int = 0):
    """A tiny float64 DeepSeek-V3 (YaRN on, non-zero balancing biases) whose weights keep attention far
    from uniform, so that every planted bug shows in its trace."""
    cfg = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)
    torch.manual_seed(seed)
    model = DeepseekV3(cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif p.dim() > 1:
                std = 1.0 if "embed" in name else 1.5 / math.sqrt(p.shape[-1])
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=b.dtype))
    return model


def _mysteries() -> list[tuple[str, dict]]:
    g = torch.Generator().manual_seed(4)
    planted = [("swapped_shared_expert", 2), ("non_interleaved_rope", None), None, ("bias_in_combine_weights", 1),
               ("yarn_without_mscale", None), ("swapped_shared_expert", 1)]
    cases = []
    for i, answer in enumerate(planted):
        ids = torch.randint(2, 512, (2, 24), generator=g)
        cases.append((f"mystery {i + 1}", dict(seed=10 + i, input_ids=ids, answer=answer)))
    return cases


def _bug_judge(diagnose: Callable) -> Callable[[str, dict], None]:
    def judge(case: str, x: dict) -> None:
        model = mystery_model(x["seed"])
        reference = trace(model, x["input_ids"])
        with plant(model, x["answer"]):
            suspect = trace(model, x["input_ids"])
        got = diagnose(reference=model, suspect=suspect, input_ids=x["input_ids"].clone())
        if got is not None and not (isinstance(got, tuple) and len(got) == 2):
            raise _Fail(f"expected (bug name, layer) or None, got {got!r}")
        if got == x["answer"]:
            return
        with plant(model, got):  # an answer whose bug computes exactly what the planted one computes is right too
            theirs = trace(model, x["input_ids"])
        if compare(suspect, theirs, rtol=1e-12).ok:
            return
        truth = compare(reference, suspect).first_divergence or "nowhere (no bug)"
        yours = compare(reference, theirs).first_divergence or "nowhere (no bug)"
        raise _Fail(f"you answered {got!r}; the planted bug was {x['answer']!r}. compare(reference, suspect) first "
                    f"diverges at {truth!r}; your answer, planted in the reference, first diverges at {yours!r} "
                    "(plant a candidate with dsv3ref.exercises.plant(model, answer) and compare its trace with the "
                    "suspect's: the right one matches it exactly)")
    return judge


def check_bug_hunt(diagnose: Callable) -> Verdict:
    """Check diagnose(reference, suspect, input_ids) -> (bug name, layer or None), or None for no bug:
    reference is a mystery_model, suspect the trace (dsv3ref.trace) of the same model with a hidden bug
    from bugs() planted (or none), on input_ids."""
    return _run_cases("bug hunt", "diagnose", _mysteries(), _bug_judge(diagnose))


CHECKERS = {"routing": check_routing, "absorbed_attention": check_absorbed_attention,
            "mtp_combine": check_mtp_combine, "quantization": check_quantization, "bug_hunt": check_bug_hunt}
"""Exercise name -> checker."""
