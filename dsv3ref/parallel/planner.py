"""How many GPUs, how much memory: a per-GPU memory plan for a configuration and a parallel layout.

Weight bytes are exact, from the configuration's shapes and the release's dtypes: the linear
projections of attention and of every FFN in E4M3 (1 byte) with one float32 scale per 128x128 block
(`gemm_impl="fp8"`), or in BF16 (`"bf16"`); embedding, head, norms, router weights and the MTP
module's eh_proj in BF16; the router bias in float32. The split is the plan of
`dsv3ref.parallel.plan` (the tests hold the two equal on the meta device under a fake process group).

Latent cache: (kv_lora_rank + qk_rope_head_dim) BF16 numbers per token and layer, 70,272 bytes per
token for DeepSeek-V3. With tensor-parallel attention every GPU holds the latent cache of every
sequence (the latent is shared by all heads, so it cannot be split by heads); with data-parallel
attention each GPU holds only its own sequences'. Activations: an estimate of the peak of a prefill
chunk (formula in `activation_bytes`), plus a fixed reserve for the CUDA context, NCCL buffers and
the allocator's slack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv3ref.config import ModelConfig
from dsv3ref.fp8 import BLOCK
from dsv3ref.impl import check_choice
from dsv3ref.mtp import checkpoint_copies
from dsv3ref.parallel.layers import ParallelError, even_split, split_range

GIB = 2**30
MIB = 2**20
GPU_MEMORY = {"H200-141GB": 143_771 * MIB, "H100-80GB": 81_559 * MIB, "H800-80GB": 81_559 * MIB}
"""Memory each GPU reports (nvidia-smi's total, MiB)."""
RESERVE_BYTES = 3 * GIB
"""Kept free per GPU for the CUDA context, NCCL buffers and allocator slack (an estimate)."""
MACHINES = (
    ("1x8 H200-141GB", 1, 8, "H200-141GB", "fp8"),
    ("1x8 H100-80GB", 1, 8, "H100-80GB", "fp8"),
    ("2x8 H100-80GB", 2, 8, "H100-80GB", "fp8"),
    ("2x8 H800-80GB", 2, 8, "H800-80GB", "fp8"),
    ("2x8 H200-141GB", 2, 8, "H200-141GB", "bf16"),
)
"""(name, nodes, GPUs per node, GPU, gemm_impl): the machines the full model is usually run on."""


@dataclass(frozen=True)
class Size:
    """Elements and bytes of some tensors (FP8 scales count as elements too, as in the release)."""

    elements: int = 0
    nbytes: int = 0

    def __add__(self, other: Size) -> Size:
        return Size(self.elements + other.elements, self.nbytes + other.nbytes)

    def __mul__(self, n: int) -> Size:
        return Size(self.elements * n, self.nbytes * n)

    __rmul__ = __mul__


def _bf16(n: int) -> Size:
    return Size(n, 2 * n)


def _linear(out: int, inp: int, fp8: bool) -> Size:
    """A linear weight (out, in): E4M3 plus float32 128x128 block scales, or BF16."""
    if fp8:
        scales = math.ceil(out / BLOCK) * math.ceil(inp / BLOCK)
        return Size(out * inp + scales, out * inp + 4 * scales)
    return _bf16(out * inp)


def _split(total: int, world: int, rank: int, unit: int, tp: bool) -> int:
    """This rank's part of a width split by the plan (whole when not tensor-parallel)."""
    if not tp:
        return total
    start, stop = split_range(total, world, rank, unit)
    return stop - start


def layer_size(cfg: ModelConfig, layer: int, world: int, rank: int, layout: str, fp8: bool) -> Size:
    """Decoder layer `layer` (an MTP module's too, with its extra norms and eh_proj) on `rank`."""
    tp = layout == "tp"
    d, h = cfg.hidden_size, cfg.num_attention_heads
    h0, h1 = even_split(h, world, rank, "num_attention_heads") if tp else (0, h)
    h_local = h1 - h0
    qk, kv = cfg.qk_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim
    total = 2 * _bf16(d)  # input_layernorm, post_attention_layernorm
    if cfg.q_lora_rank is None:
        total += _linear(h_local * qk, d, fp8)
    else:
        total += _linear(cfg.q_lora_rank, d, fp8) + _bf16(cfg.q_lora_rank) + _linear(h_local * qk, cfg.q_lora_rank, fp8)
    total += _linear(cfg.kv_lora_rank + cfg.qk_rope_head_dim, d, fp8) + _bf16(cfg.kv_lora_rank)
    total += _linear(h_local * kv, cfg.kv_lora_rank, fp8) + _linear(d, h_local * cfg.v_head_dim, fp8)
    unit = BLOCK if fp8 else 1

    def ffn(width: int) -> Size:
        w = _split(width, world, rank, unit, tp)
        return 2 * _linear(w, d, fp8) + _linear(d, w, fp8)

    if cfg.is_moe_layer(layer):
        e0, e1 = even_split(cfg.n_routed_experts, world, rank, "n_routed_experts")
        total += _bf16(cfg.n_routed_experts * d)  # router weight
        if cfg.topk_method == "noaux_tc":
            total += Size(cfg.n_routed_experts, 4 * cfg.n_routed_experts)  # router bias, float32
        inter = cfg.moe_intermediate_size
        total += (e1 - e0) * (2 * _linear(inter, d, fp8) + _linear(d, inter, fp8))
        if cfg.n_shared_experts:
            total += ffn(cfg.n_shared_experts * inter)
    else:
        total += ffn(cfg.intermediate_size)
    if layer >= cfg.num_hidden_layers:  # an MTP module: enorm, hnorm, eh_proj, shared_head.norm
        total += 3 * _bf16(d) + _bf16(2 * d * d)
    return total


def model_size(cfg: ModelConfig, world_size: int, rank: int = 0, layout: str = "tp", gemm_impl: str = "fp8",
               mtp: bool = False) -> Size:
    """The weights rank `rank` holds (main model; MTP modules too if mtp)."""
    check_choice("layout", layout)
    fp8 = check_choice("gemm_impl", gemm_impl) == "fp8"
    tp = layout == "tp" and world_size > 1
    v, d = cfg.vocab_size, cfg.hidden_size
    v0, v1 = even_split(v, world_size, rank, "vocab_size") if tp else (0, v)
    total = (1 if cfg.tie_word_embeddings else 2) * _bf16((v1 - v0) * d) + _bf16(d)  # embedding, head, final norm
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    lay = layout if tp else "dp"
    for i in range(layers):
        total += layer_size(cfg, i, world_size, rank, lay, fp8)
    return total


def weight_bytes(cfg: ModelConfig, world_size: int, rank: int = 0, layout: str = "tp", gemm_impl: str = "fp8",
                 mtp: bool = False) -> int:
    """Exact bytes of the weights rank `rank` holds (main model; MTP modules too if mtp)."""
    return model_size(cfg, world_size, rank, layout, gemm_impl, mtp).nbytes


def checkpoint_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """(bytes, elements) of the released checkpoint's tensors for `cfg`, FP8 as released: every
    layer including the MTP modules, with the MTP modules' own copies of the embedding and head."""
    size = model_size(cfg, 1, 0, "tp", "fp8" if cfg.quantization_config is not None else "bf16", mtp=True)
    size += len(checkpoint_copies(cfg)) * _bf16(cfg.vocab_size * cfg.hidden_size)
    return size.nbytes, size.elements


def cache_bytes_per_token(cfg: ModelConfig) -> int:
    """Latent-cache bytes of one token across the main layers, in BF16 (70,272 for DeepSeek-V3)."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2


def activation_bytes(cfg: ModelConfig, world_size: int, layout: str, chunk: int, batch_size: int) -> int:
    """An estimate of the activation peak of one prefill chunk of `chunk` tokens on one GPU (BF16
    activations, float32 attention scores): about ten (chunk, dim) hidden states, the chunk's
    queries, expanded keys and values of this GPU's heads, its FFN intermediates, one (heads, chunk,
    chunk) float32 score matrix and its softmax, and float32 logits of the last token of each row."""
    heads = cfg.num_attention_heads // world_size if layout == "tp" else cfg.num_attention_heads
    per_token = 10 * cfg.hidden_size + heads * (cfg.qk_head_dim * 2 + cfg.v_head_dim)
    per_token += 3 * max(cfg.intermediate_size // (world_size if layout == "tp" else 1),
                         cfg.num_experts_per_tok * cfg.moe_intermediate_size)
    return chunk * per_token * 2 + 2 * heads * chunk * chunk * 4 + batch_size * cfg.vocab_size * 4


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of one configuration, world size and layout (bytes unless said otherwise)."""

    world_size: int
    layout: str
    gemm_impl: str
    batch_size: int
    seq_len: int
    gpu_memory: int
    weights: int
    """The most any rank holds (ranks differ by at most one 128-block of an FFN)."""
    cache: int
    """Latent cache of this GPU's sequences (tp: all batch_size of them; dp: its share) at seq_len."""
    activations: int
    reserve: int
    cache_tokens_fit: int
    """Tokens of latent cache the memory left after weights, activations and reserve holds, per GPU."""
    total_tokens_fit: int
    """The same for the whole system: per GPU under dp (each GPU its own sequences), once under tp."""

    @property
    def used(self) -> int:
        return self.weights + self.cache + self.activations + self.reserve

    @property
    def fits(self) -> bool:
        return self.used <= self.gpu_memory


def plan(cfg: ModelConfig, world_size: int, layout: str = "tp", gemm_impl: str = "fp8",
         gpu_memory_gib: float = 143_771 / 1024, batch_size: int = 1, seq_len: int = 4096,
         prefill_chunk: int = 4096, mtp: bool = False) -> MemoryPlan:
    """The per-GPU memory plan (see the module docstring); `dsv3ref.plan` and `python -m dsv3ref plan`."""
    for name, value in (("world_size", world_size), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("prefill_chunk", prefill_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive integer, found {value!r}")
    if not gpu_memory_gib > 0:
        raise ValueError(f"gpu_memory_gib: expected a positive number, found {gpu_memory_gib!r}")
    check_choice("layout", layout)
    ranks = range(world_size) if world_size <= 64 else (0, world_size - 1)
    try:
        weights = max(weight_bytes(cfg, world_size, r, layout, gemm_impl, mtp) for r in ranks)
    except ParallelError as e:
        raise ValueError(str(e)) from None
    per_token = cache_bytes_per_token(cfg)
    rows = batch_size if layout == "tp" else math.ceil(batch_size / world_size)
    cache = rows * seq_len * per_token
    activations = activation_bytes(cfg, world_size, layout, min(seq_len, prefill_chunk), rows)
    memory = int(gpu_memory_gib * GIB)
    left = memory - weights - activations - RESERVE_BYTES
    fit = max(left // per_token, 0)
    return MemoryPlan(world_size=world_size, layout=layout, gemm_impl=gemm_impl, batch_size=batch_size,
                      seq_len=seq_len, gpu_memory=memory, weights=weights, cache=cache, activations=activations,
                      reserve=RESERVE_BYTES, cache_tokens_fit=fit,
                      total_tokens_fit=fit * (world_size if layout == "dp" else 1))


def machine_table(cfg: ModelConfig, batch_size: int = 32, seq_len: int = 4096) -> list[dict]:
    """The plan on each of MACHINES, both layouts: one dict per (machine, layout) row."""
    rows = []
    for name, nodes, per_node, gpu, gemm in MACHINES:
        for layout in ("tp", "dp"):
            p = plan(cfg, nodes * per_node, layout, gemm, GPU_MEMORY[gpu] / GIB, batch_size, seq_len)
            rows.append({"machine": name, "gemm_impl": gemm, "layout": layout, "weights_gb": p.weights / 1e9,
                         "cache_gb": p.cache / 1e9, "activations_gb": p.activations / 1e9,
                         "gpu_gb": p.gpu_memory / 1e9, "tokens_fit_per_gpu": p.cache_tokens_fit,
                         "tokens_fit_total": p.total_tokens_fit, "fits": p.fits})
    return rows


def format_table(rows: list[dict]) -> str:
    """machine_table's rows as a fixed-width text table."""
    head = (f"{'machine':16} {'gemm':4} {'layout':6} {'weights GB':>10} {'cache GB':>9} {'act GB':>7} {'GPU GB':>7} "
            f"{'cache tokens/GPU':>17} {'cache tokens, all':>18}  fits")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['machine']:16} {r['gemm_impl']:4} {r['layout']:6} {r['weights_gb']:10.1f} "
                     f"{r['cache_gb']:9.1f} {r['activations_gb']:7.1f} {r['gpu_gb']:7.1f} "
                     f"{r['tokens_fit_per_gpu']:17,} {r['tokens_fit_total']:18,}  {'yes' if r['fits'] else 'NO'}")
    return "\n".join(lines)
