"""How the model computes: one vocabulary for every implementation choice.

The configuration (`ModelConfig`) says *what* is computed: the checkpoint's mathematics. An
`Implementation` says *how*: which of dsv3ref's equivalent code paths run it. Every path is
tested equal to the readable one, so a choice changes speed and memory, never the result beyond
rounding (FP8 GEMMs aside: they quantize activations, by design).

| field        | values                                   | readable oracle | where it acts                       |
|--------------|------------------------------------------|-----------------|-------------------------------------|
| `attn_impl`  | "naive", "absorb"                        | "naive"         | `mla.MLA`, the cache kind           |
| `attn_order` | "auto", "absorbed", "expanded"           | "auto"          | `mla.MLA` with attn_impl="absorb"   |
| `moe_impl`   | "loop", "grouped"                        | "loop"          | `moe.MoE`                           |
| `gemm_impl`  | "bf16", "fp8"                            | "bf16"          | checkpoint loading (`FP8Linear`)    |
| `fp8_kernel` | "emulate", "dequantize", "scaled_mm"     | "emulate"       | `fp8.FP8Linear`, FP8 training       |
| `layout`     | "tp", "dp"                               | one process     | `dsv3ref.parallel` (attention etc.) |
| `moe_comm`   | "allreduce", "alltoall"                  | one process     | `dsv3ref.parallel` (routed experts) |

The same names are used everywhere: `DeepseekV3(cfg, attn_impl=...)`, `DeepseekV3.from_pretrained(...,
attn_impl=...)`, `model.impl`, `model.new_cache` and `KVCache(attn_impl=...)`, `kv_cache_bytes` (keyed
by attn_impl), the CLI flags (`--attn-impl`, ...) and the docs. They are checked here and only here.

Loading also takes "auto" for `gemm_impl` ("fp8" when the checkpoint stores FP8 weights, else "bf16"),
`fp8_kernel` (torch's blockwise "scaled_mm" where the device runs it, else "emulate"), `moe_impl`
("grouped", or "loop" for FP8 weights) and the dtype (bfloat16 on CUDA, float32 elsewhere): a request
resolved where the checkpoint and the device are known (`dsv3ref.checkpoint.resolve_implementation`).
`model.impl` always holds the resolved choice.

The last two say how a model is spread over processes (`dsv3ref.parallel.Parallel`): `layout` "tp"
splits attention heads, dense FFNs, vocabulary and experts over the ranks (DeepSeek's inference
layout), "dp" gives each rank its own batch rows with replicated attention (data-parallel attention)
and splits only the routed experts; `moe_comm` "allreduce" lets every rank compute its experts on
every token and sums, "alltoall" sends each token only to the ranks owning its chosen experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

CHOICES: dict[str, tuple[str, ...]] = {
    "attn_impl": ("naive", "absorb"),
    "attn_order": ("auto", "absorbed", "expanded"),
    "moe_impl": ("loop", "grouped"),
    "gemm_impl": ("bf16", "fp8"),
    "fp8_kernel": ("emulate", "dequantize", "scaled_mm"),
    "layout": ("tp", "dp"),
    "moe_comm": ("allreduce", "alltoall"),
}
"""Every field and the values it takes."""


AUTO = "auto"
"""What loading and the CLI take for gemm_impl, fp8_kernel, moe_impl and dtype: decided from the
checkpoint and the device (see the module docstring), never held by a model."""
AUTO_FIELDS = ("moe_impl", "gemm_impl", "fp8_kernel")


def check_request(field: str, value: Any) -> str:
    """check_choice, also accepting "auto" where loading resolves it (AUTO_FIELDS)."""
    if field in AUTO_FIELDS and value == AUTO:
        return value
    if value not in CHOICES[field]:
        extra = (AUTO,) if field in AUTO_FIELDS else ()
        raise ValueError(f"{field}: found {value!r}, expected one of {CHOICES[field] + extra}")
    return value


PARALLEL_FIELDS = ("layout", "moe_comm")
"""The fields of CHOICES that say how a model is spread over processes (`dsv3ref.parallel.Parallel`);
the others are `Implementation`'s."""


def check_choice(field: str, value: Any) -> str:
    """Return value if it is one of CHOICES[field], else raise a ValueError naming the field."""
    if value not in CHOICES[field]:
        raise ValueError(f"{field}: found {value!r}, expected one of {CHOICES[field]}")
    return value


@dataclass(frozen=True)
class Implementation:
    """Which code paths compute the model (see the module docstring for every value)."""

    attn_impl: str = "naive"
    """"naive": expand per-head keys and values from the latent (cache: per-head K and V); "absorb":
    attend in latent space with W^UK and W^UV folded in (cache: the latent c^KV and k^R)."""
    attn_order: str = "auto"
    """For attn_impl="absorb": the order a chunk is computed in ("auto": the cheaper one where both
    orders round alike, else the absorbed one; see dsv3ref.mla)."""
    moe_impl: str = "loop"
    """"loop": one expert at a time; "grouped": stacked expert weights and one grouped GEMM."""
    gemm_impl: str = "bf16"
    """For FP8 checkpoints: "bf16" dequantizes the weights on load; "fp8" keeps them in FP8 and runs
    the block-scaled FP8 GEMM (1 x 128 activation tiles, 128 x 128 weight blocks)."""
    fp8_kernel: str = "emulate"
    """For gemm_impl="fp8": "emulate" (the exact block-scaled GEMM, any device), "dequantize" (the same
    E4M3 operands and scales, dequantized and multiplied in one GEMM of the activations' precision: the
    fast path on a CPU) or "scaled_mm" (torch's scaled_mm). See dsv3ref.fp8."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_choice(field.name, getattr(self, field.name))
        if self.attn_order != "auto" and self.attn_impl != "absorb":
            raise ValueError(f"attn_order={self.attn_order!r} chooses the order of absorbed attention: it needs "
                             f"attn_impl='absorb' (found {self.attn_impl!r})")
        if self.fp8_kernel != "emulate" and self.gemm_impl != "fp8":
            raise ValueError(f"fp8_kernel={self.fp8_kernel!r} chooses how FP8 weights are multiplied: it needs "
                             "gemm_impl='fp8'")
        if self.gemm_impl == "fp8" and self.moe_impl != "loop":
            raise ValueError("gemm_impl='fp8' runs the experts as separate FP8 layers: use moe_impl='loop'")

    def replace(self, **changes: Any) -> Implementation:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)
