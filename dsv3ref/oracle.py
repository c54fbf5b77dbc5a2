"""dsv3ref as an oracle: trace every intermediate tensor, compare two traces, find the first divergence.

A *trace* is an ordered dict from a point in the network to the tensor seen there. Points are named
after the published checkpoint's modules, so that they line up with forward hooks on any other
implementation that uses the same names (Hugging Face transformers does):

| key                                              | what                                   |
|--------------------------------------------------|----------------------------------------|
| `model.embed_tokens`                             | token embeddings (b, t, d)             |
| `model.layers.{i}.input_layernorm:input`         | residual stream before attention       |
| `model.layers.{i}.self_attn`                     | attention output (after o_proj)        |
| `model.layers.{i}.post_attention_layernorm:input`| residual stream after attention        |
| `model.layers.{i}.mlp.gate:ids`, `:weights`      | the router's choice and gate values    |
| `model.layers.{i}.mlp.experts`                   | routed experts' combined output        |
| `model.layers.{i}.mlp.shared_experts`            | shared experts' output                 |
| `model.layers.{i}.mlp`                           | FFN output (dense or MoE)              |
| `model.layers.{i}`                               | residual stream after the FFN          |
| `model.norm`                                     | final norm output                      |
| `model.layers.{L + k - 1}`                       | MTP module k's hidden state h^k        |
| `lm_head`                                        | logits                                 |

With `ops=True` the trace also holds the output of every linear projection of attention and of the
dense and shared FFNs (`model.layers.{i}.self_attn.q_a_proj`, `...mlp.shared_experts.down_proj`, ...):
the GEMMs an FP8 kernel computes, and `self_attn.o_proj:input`, the attention core's output (softmax
and the value product: what an MLA decoding kernel computes). Then a first divergence names the op: a
projection, `o_proj:input` with the projections before it equal (the attention core), or
`mlp.experts` with the router and shared experts equal (the routed experts' grouped GEMM).

`trace_modules(model, run)` collects these with forward hooks on whatever model it is given and
removes them afterwards: tracing costs nothing when it is off. `trace(model, input_ids)` applies it
to dsv3ref, `trace_hf(hf_model, input_ids)` to transformers' DeepseekV3ForCausalLM; for another
implementation, name (or wrap) its modules like the checkpoint and call `trace_modules`.

`compare(reference, other)` lines two traces up point by point. Rounding differences show as
small relative errors everywhere; a bug shows as a first point past tolerance. A token whose set of
chosen experts differs is counted as a routing flip, apart: it is a different kind of error (often a
near-tie pushed over by rounding) and everything downstream of it differs legitimately.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3ref.mtp import mtp_chain

_POINTS = [
    (re.compile(r"^model\.embed_tokens$"), "output"),
    (re.compile(r"^model\.layers\.\d+\.input_layernorm$"), "input"),
    (re.compile(r"^model\.layers\.\d+\.self_attn$"), "output"),
    (re.compile(r"^model\.layers\.\d+\.post_attention_layernorm$"), "input"),
    (re.compile(r"^model\.layers\.\d+\.mlp\.gate$"), "router"),
    (re.compile(r"^model\.layers\.\d+\.mlp\.experts$"), "output"),
    (re.compile(r"^model\.layers\.\d+\.mlp\.shared_experts$"), "output"),
    (re.compile(r"^model\.layers\.\d+\.mlp$"), "output"),
    (re.compile(r"^model\.layers\.\d+$"), "output"),
    (re.compile(r"^model\.norm$"), "output"),
    (re.compile(r"^lm_head$"), "output"),
]

_OP_POINTS = [
    (re.compile(r"^model\.layers\.\d+\.self_attn\.o_proj$"), "input"),  # the attention core's output
    (re.compile(r"^model\.layers\.\d+\.self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)$"),
     "output"),
    (re.compile(r"^model\.layers\.\d+\.mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)$"), "output"),
]
"""The projections `ops=True` adds (the routed experts' own projections are left out: a grouped GEMM
computes them without calling them one by one)."""

Trace = dict[str, torch.Tensor]


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def trace_modules(model: nn.Module, run: Callable[[], object], ops: bool = False) -> Trace:
    """Call run() with forward hooks on `model`'s modules named as in the table above; return what
    they saw, in execution order. A module called twice gets keys `name`, `name#2`, ...

    Router outputs are read as (..., weights, ids): dsv3ref returns (weights, ids), transformers
    (logits, weights, ids). ops: also the projections (see the module docstring).
    """
    out: Trace = {}
    points = _POINTS + (_OP_POINTS if ops else [])

    def put(key: str, t: torch.Tensor) -> None:
        n, base = 1, key
        while key in out:
            n += 1
            key = f"{base}#{n}"
        out[key] = t.detach().clone()

    def make_hook(name: str, kind: str):
        if kind == "input":
            return lambda module, args: put(f"{name}:input", args[0])
        if kind == "router":
            def router_hook(module, args, result):
                put(f"{name}:weights", result[-2])
                put(f"{name}:ids", result[-1])
            return router_hook
        return lambda module, args, result: put(name, _first_tensor(result))

    handles = []
    try:
        for name, module in model.named_modules():
            for pattern, kind in points:
                if pattern.match(name):
                    hook = make_hook(name, kind)
                    handles.append(module.register_forward_pre_hook(hook) if kind == "input"
                                   else module.register_forward_hook(hook))
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return out


def trace(model: nn.Module, input_ids: torch.Tensor, ops: bool = False, **forward_kwargs) -> Trace:
    """The trace of one dsv3ref forward pass `model(input_ids, **forward_kwargs)` (ops: also every
    projection, see the module docstring).

    For a model with MTP modules (and no cache), the MTP chain is traced too, as in training: module
    k reads h^{k-1} at positions 0..T-1-k and the tokens t_k..t_{T-1}; its output h^k is the point
    `model.layers.{num_hidden_layers + k - 1}` (with its inner points under the same prefix).
    """
    out = trace_modules(model, lambda: model(input_ids, **forward_kwargs), ops)
    depth = len(getattr(model, "mtp_layers", ()))
    if depth and not forward_kwargs and input_ids.shape[1] > depth:
        def run_mtp() -> None:
            mtp_chain(model, out["model.norm"], input_ids)
        n = model.config.num_hidden_layers
        in_mtp = re.compile(rf"^model\.layers\.({'|'.join(str(n + k) for k in range(depth))})([.:]|$)")
        # keep the MTP modules' points; the shared embedding's second use is not a new point
        out.update({key: value for key, value in trace_modules(model, run_mtp, ops).items() if in_mtp.match(key)})
    return out


def trace_hf(hf_model: nn.Module, input_ids: torch.Tensor) -> Trace:
    """The trace of transformers' DeepseekV3ForCausalLM on the same input (no cache)."""
    return trace_modules(hf_model, lambda: hf_model(input_ids, use_cache=False))


@dataclass
class Row:
    key: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


@dataclass
class Comparison:
    """The result of `compare`: one row per common point, in the reference's order."""

    rows: list[Row]
    first_divergence: str | None
    """The first point past tolerance (routing points excluded), or None."""
    routing_flips: dict[str, int] = field(default_factory=dict)
    """Per router: tokens whose chosen experts differ as a set."""
    missing: list[str] = field(default_factory=list)
    """Points of the reference that the other trace lacks."""

    @property
    def ok(self) -> bool:
        return self.first_divergence is None and not any(self.routing_flips.values())

    def __str__(self) -> str:
        lines = [f"{'':2s}{'point':52s} {'shape':>18s} {'max abs err':>12s} {'max rel err':>12s}"]
        for r in self.rows:
            mark = ">>" if r.key == self.first_divergence else ("  " if r.ok else " !")
            lines.append(f"{mark}{r.key:52s} {str(r.shape):>18s} {r.max_abs:12.3e} {r.max_rel:12.3e} {r.note}")
        flips = sum(self.routing_flips.values())
        lines.append(f"first divergence: {self.first_divergence or 'none'}; routing flips: {flips} token(s)"
                     + (f" in {', '.join(k for k, v in self.routing_flips.items() if v)}" if flips else ""))
        if self.missing:
            lines.append(f"missing in the other trace: {', '.join(self.missing)}")
        return "\n".join(lines)


def compare(reference: Trace, other: Trace, rtol: float = 1e-5, atol: float = 0.0) -> Comparison:
    """Compare `other` against `reference` point by point.

    A tensor point passes when max |other - ref| <= atol + rtol * max |ref| (errors relative to the
    scale of the reference tensor, so small entries do not dominate). Router ids are compared per
    token as sets; gate values after putting each token's experts in the same order.
    """
    rows: list[Row] = []
    flips: dict[str, int] = {}
    first = None
    missing = [k for k in reference if k not in other]
    for key, ref in reference.items():
        if key not in other:
            continue
        got = other[key]
        if key.endswith(":ids"):
            a, b = ref.reshape(-1, ref.shape[-1]).sort(-1).values, got.reshape(-1, got.shape[-1]).sort(-1).values
            n_flip = int((a != b).any(-1).sum())
            flips[key.removesuffix(":ids")] = n_flip
            rows.append(Row(key, tuple(ref.shape), float(n_flip), float(n_flip) / a.shape[0], n_flip == 0,
                            f"{n_flip} token(s) chose other experts" if n_flip else ""))
            continue
        if key.endswith(":weights"):
            ids_key = key.removesuffix(":weights") + ":ids"
            if ids_key in reference and ids_key in other:  # align each token's experts
                ref = ref.gather(-1, reference[ids_key].argsort(-1))
                got = got.gather(-1, other[ids_key].argsort(-1))
        if ref.numel() != got.numel():
            rows.append(Row(key, tuple(ref.shape), float("inf"), float("inf"), False,
                            f"shape {tuple(got.shape)} != {tuple(ref.shape)}"))
            first = first or key
            continue
        diff = (got.reshape(ref.shape).double() - ref.double()).abs().max().item()
        scale = ref.double().abs().max().item()
        ok = diff <= atol + rtol * scale
        rows.append(Row(key, tuple(ref.shape), diff, diff / scale if scale else float("inf") * diff, ok))
        if not ok and first is None:
            first = key
    return Comparison(rows=rows, first_divergence=first, routing_flips=flips, missing=missing)
