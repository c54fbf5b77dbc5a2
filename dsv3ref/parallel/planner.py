"""How many GPUs, how much memory: a per-GPU memory plan for a configuration and a parallel layout.

Counted by hand from the configuration, independently of the code that runs (which
dsv3ref.parallel.simulate measures; the tests hold the two together):

- **weights**, exact: the linear projections of attention and of every FFN in E4M3 (1 byte) with one
  float32 scale per 128x128 block (`gemm_impl="fp8"`), or in the model's dtype (`"bf16"`: dequantized
  on load); embedding, head, norms, router weights and the MTP module's eh_proj in the model's dtype;
  the router bias in float32 (at least); the MTP module only when it is loaded (speculative decoding).
  The split is the plan of `dsv3ref.parallel.plan`.
- **derived**: what the model computes from its weights once and keeps: with FP8 weights, absorbed
  attention's dequantized kv_b_proj (this rank's heads, in the model's dtype).
- **latent cache**: (kv_lora_rank + qk_rope_head_dim) numbers per token and layer in the model's dtype,
  70,272 bytes per token for DeepSeek-V3 in BF16. With tensor-parallel attention every GPU holds the
  latent cache of every sequence (the latent is shared by all heads, so it cannot be split by heads);
  with data-parallel attention each GPU holds only its own sequences'.
- **activations**: the peak of one prefill pass of `prefill_chunk` tokens (`activation_bytes`: the
  attention scores of the pass against the whole cache, or the experts' exchange buffers, whichever is
  larger, over the hidden states of the pass), and of one decode step;
- a fixed **reserve** for the CUDA context, NCCL buffers and the allocator's slack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv3ref.config import ModelConfig
from dsv3ref.fp8 import BLOCK
from dsv3ref.impl import check_choice
from dsv3ref.mla import absorbed_is_cheaper
from dsv3ref.mtp import checkpoint_copies
from dsv3ref.parallel.layers import ParallelError, even_split, split_range
from dsv3ref.prefill import DEFAULT_PREFILL_CHUNK, chunk_width

GIB = 2**30
MIB = 2**20
GPU_MEMORY = {"H200-141GB": 143_771 * MIB, "H100-80GB": 81_559 * MIB, "H800-80GB": 81_559 * MIB}
"""Memory each GPU reports (nvidia-smi's total, MiB): 140.4 GiB (150.8 GB) and 79.6 GiB (85.5 GB)."""
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


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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


def _dense(n: int, size: int) -> Size:
    """n numbers of `size` bytes each (a norm, an embedding, a router weight...)."""
    return Size(n, size * n)


def _linear(out: int, inp: int, fp8: bool, size: int) -> Size:
    """A linear weight (out, in): E4M3 plus float32 128x128 block scales, or `size` bytes a number."""
    if fp8:
        scales = math.ceil(out / BLOCK) * math.ceil(inp / BLOCK)
        return Size(out * inp + scales, out * inp + 4 * scales)
    return _dense(out * inp, size)


def _split(total: int, world: int, rank: int, unit: int, tp: bool) -> int:
    """This rank's part of a width split by the plan (whole when not tensor-parallel)."""
    if not tp:
        return total
    start, stop = split_range(total, world, rank, unit)
    return stop - start


def _local_heads(cfg: ModelConfig, world: int, rank: int, layout: str) -> int:
    if layout != "tp":
        return cfg.num_attention_heads
    h0, h1 = even_split(cfg.num_attention_heads, world, rank, "num_attention_heads")
    return h1 - h0


def layer_size(cfg: ModelConfig, layer: int, world: int, rank: int, layout: str, fp8: bool,
               dtype: torch.dtype = torch.bfloat16) -> Size:
    """Decoder layer `layer` (an MTP module's too, with its extra norms and eh_proj) on `rank`."""
    tp = layout == "tp"
    e = _nbytes(dtype)
    d, h_local = cfg.hidden_size, _local_heads(cfg, world, rank, layout)
    qk, kv = cfg.qk_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim
    total = 2 * _dense(d, e)  # input_layernorm, post_attention_layernorm
    if cfg.q_lora_rank is None:
        total += _linear(h_local * qk, d, fp8, e)
    else:
        total += (_linear(cfg.q_lora_rank, d, fp8, e) + _dense(cfg.q_lora_rank, e)
                  + _linear(h_local * qk, cfg.q_lora_rank, fp8, e))
    total += _linear(cfg.kv_lora_rank + cfg.qk_rope_head_dim, d, fp8, e) + _dense(cfg.kv_lora_rank, e)
    total += _linear(h_local * kv, cfg.kv_lora_rank, fp8, e) + _linear(d, h_local * cfg.v_head_dim, fp8, e)
    unit = BLOCK if fp8 else 1

    def ffn(width: int) -> Size:
        w = _split(width, world, rank, unit, tp)
        return 2 * _linear(w, d, fp8, e) + _linear(d, w, fp8, e)

    if cfg.is_moe_layer(layer):
        e0, e1 = even_split(cfg.n_routed_experts, world, rank, "n_routed_experts")
        total += _dense(cfg.n_routed_experts * d, e)  # router weight
        if cfg.topk_method == "noaux_tc":
            total += _dense(cfg.n_routed_experts, max(e, 4))  # router bias: float32 at least
        inter = cfg.moe_intermediate_size
        total += (e1 - e0) * (2 * _linear(inter, d, fp8, e) + _linear(d, inter, fp8, e))
        if cfg.n_shared_experts:
            total += ffn(cfg.n_shared_experts * inter)
    else:
        total += ffn(cfg.intermediate_size)
    if layer >= cfg.num_hidden_layers:  # an MTP module: enorm, hnorm, eh_proj, shared_head.norm
        total += 3 * _dense(d, e) + _dense(2 * d * d, e)
    return total


def model_size(cfg: ModelConfig, world_size: int, rank: int = 0, layout: str = "tp", gemm_impl: str = "fp8",
               mtp: bool = False, dtype: torch.dtype = torch.bfloat16) -> Size:
    """The weights rank `rank` holds (main model; MTP modules too if mtp), non-FP8 tensors in `dtype`."""
    check_choice("layout", layout)
    fp8 = check_choice("gemm_impl", gemm_impl) == "fp8"
    even_split(cfg.n_routed_experts, world_size, rank, "n_routed_experts")  # the plan's first question too
    tp = layout == "tp" and world_size > 1
    v, d, e = cfg.vocab_size, cfg.hidden_size, _nbytes(dtype)
    v0, v1 = even_split(v, world_size, rank, "vocab_size") if tp else (0, v)
    total = (1 if cfg.tie_word_embeddings else 2) * _dense((v1 - v0) * d, e) + _dense(d, e)  # embedding, head, norm
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    lay = layout if tp else "dp"
    for i in range(layers):
        total += layer_size(cfg, i, world_size, rank, lay, fp8, dtype)
    return total


def weight_bytes(cfg: ModelConfig, world_size: int, rank: int = 0, layout: str = "tp", gemm_impl: str = "fp8",
                 mtp: bool = False, dtype: torch.dtype = torch.bfloat16) -> int:
    """Exact bytes of the weights rank `rank` holds (main model; MTP modules too if mtp)."""
    return model_size(cfg, world_size, rank, layout, gemm_impl, mtp, dtype).nbytes


def checkpoint_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """(bytes, elements) of the released checkpoint's tensors for `cfg`, FP8 as released: every
    layer including the MTP modules, with the MTP modules' own copies of the embedding and head."""
    size = model_size(cfg, 1, 0, "tp", "fp8" if cfg.quantization_config is not None else "bf16", mtp=True)
    size += len(checkpoint_copies(cfg)) * _dense(cfg.vocab_size * cfg.hidden_size, 2)
    return size.nbytes, size.elements


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, attn_impl: str = "absorb",
                          heads: int | None = None, mtp: bool = False) -> int:
    """Cache bytes of one token across the layers (70,272 for DeepSeek-V3's latent in BF16). attn_impl
    "naive" caches per-head keys and values of `heads` heads (default all); mtp: the MTP modules' too."""
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim if check_choice("attn_impl", attn_impl) == "absorb"
                 else (heads or cfg.num_attention_heads) * (cfg.qk_head_dim + cfg.v_head_dim))
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return per_layer * layers * _nbytes(dtype)


def derived_bytes(cfg: ModelConfig, world_size: int, rank: int, layout: str, gemm_impl: str, attn_impl: str,
                  dtype: torch.dtype, mtp: bool = False) -> int:
    """What the model keeps computed from its weights: with FP8 weights and absorbed attention, each
    layer's dequantized kv_b_proj (this rank's heads), built at the first forward pass."""
    if gemm_impl != "fp8" or attn_impl != "absorb":
        return 0
    h = _local_heads(cfg, world_size, rank, layout) if world_size > 1 else cfg.num_attention_heads
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return layers * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank * _nbytes(dtype)


def destinations(cfg: ModelConfig, world_size: int) -> int:
    """The most ranks one token's experts can live on: k, the world, and the group limit (topk_group
    groups of consecutive experts, each group spread over world / n_group ranks): 4 of 8 ranks for
    DeepSeek-V3 on one node (a group per GPU), 8 of 16 on two (the report's node limit, M = 4 nodes)."""
    k = cfg.num_experts_per_tok
    if cfg.n_group > 1 and cfg.topk_method in ("noaux_tc", "group_limited_greedy"):
        return min(k, world_size, cfg.topk_group * max(1, world_size // cfg.n_group))
    return min(k, world_size)


def activation_bytes(cfg: ModelConfig, world_size: int, layout: str, tokens: int, rows: int, keys: int,
                     dtype: torch.dtype = torch.bfloat16, moe_comm: str = "allreduce", expanded: bool = False) -> int:
    """The activation peak of one forward pass of `tokens` tokens (`rows` batch rows) on one GPU whose
    queries attend to `keys` cached positions.

    The peak is reached in one of two places, over the (tokens, hidden) hidden states the pass holds
    (the residual stream, the normalized input, the attention or FFN output: about six):
    - attention. In the absorbed order, the scores, (rows, heads, positions, keys) numbers: the two
      score terms and their sum in the model's dtype, then softmax in float32 (the scaled and masked
      scores and the probabilities alive together) and the probabilities cast back: 2 * e + 8 bytes a
      score in BF16 (e = 2), 12 in float32, 24 in float64. In the expanded order (`expanded`: what
      attn_order "auto" takes for a float32 or float64 prefill with dense weights, when it is
      cheaper), no scores (torch's fused attention), but every key position's expanded keys and
      values for this GPU's heads: kv_b_proj's output, the keys with the rotary part, the values
      padded to the keys' width;
    - the routed experts' buffers: "allreduce" holds one row per (token, slot) (tokens * k rows) for
      the fixed-order sum, with data-parallel attention for all world * tokens gathered tokens, plus
      the gathered tokens and their partial sums; "alltoall" sends each token it dispatches (all of
      them under "dp", its 1/world slice under "tp") to at most `destinations` ranks: the rows sent and
      received, the received rows' (row, slot) buffer, the sums sent back and the returns; and the
      experts' intermediates (gathered rows, gate and up projections, outputs) for the assignments this
      GPU serves, a 1/world share of all (balanced routing).
    The logits of each row's last position (in the model's dtype) are added.
    """
    e = _nbytes(dtype)
    tp = layout == "tp" and world_size > 1
    heads = cfg.num_attention_heads // world_size if tp else cfg.num_attention_heads
    d, k = cfg.hidden_size, cfg.num_experts_per_tok
    if expanded:
        width = cfg.qk_nope_head_dim + cfg.v_head_dim + 2 * cfg.qk_head_dim + cfg.qk_rope_head_dim
        attention = rows * keys * heads * width * e
    else:
        per_score = e + 2 * max(e, 4) + (e if e < 4 else 0)
        attention = heads * tokens * keys * per_score + 2 * tokens * heads * cfg.kv_lora_rank * e
    inter = cfg.moe_intermediate_size
    if world_size == 1 or moe_comm == "allreduce":
        gathered = tokens * (world_size if layout == "dp" and world_size > 1 else 1)
        experts = gathered * k * d * e + 2 * gathered * d * e
        local = gathered * k // world_size  # the assignments this rank's experts serve (balanced routing)
    else:
        dispatched = -(-tokens // world_size) if tp else tokens
        pairs = dispatched * destinations(cfg, world_size)
        experts = (3 + k) * pairs * d * e + pairs * d * e + (2 * tokens * d * e if tp else 0)
        local = dispatched * k
    # the experts' own intermediates over their assignments: the gathered rows and outputs, gate and up
    # projections, their product
    experts += local * (2 * d + 3 * inter) * e
    vocab = cfg.vocab_size // world_size if tp else cfg.vocab_size
    logits = rows * vocab * e * (2 if tp else 1)
    return 6 * tokens * d * e + max(attention, experts) + logits


def exchange_bytes(cfg: ModelConfig, world_size: int, layout: str, moe_comm: str, tokens: int, rows: int,
                   dtype: torch.dtype = torch.bfloat16, pairs: list[tuple[int, int]] | None = None) -> dict[str, int]:
    """Bytes one rank hands to each collective (the sizes of their inputs) in one forward pass of the
    main model over `tokens` tokens (this rank's own under "dp"; all of them, the same on every rank,
    under "tp") whose logits are read at `rows` positions. What goes over the wire follows from it: a
    ring all-reduce of B bytes sends 2 (world - 1) / world * B from each rank, an all-gather or
    reduce-scatter (world - 1) / world of its output or input, an all-to-all what it sends to others.

    pairs (alltoall): per MoE layer, (sent, received): the (token, rank) pairs this rank dispatches (a
    token goes once to each rank owning one of its experts) and those it receives; default: every
    token to as many ranks as the group limit allows (`destinations`), as many received (a balanced,
    symmetric routing).
    Counted by hand: the tests hold it equal to what the code hands to torch's collectives.

    tp: an all-reduce of the (tokens, hidden) states after the embedding, each o_proj, each dense FFN,
    and, with "allreduce", each MoE layer (shared and routed experts' partial sums together); the LM
    head's logits gathered. "alltoall" under tp: each rank dispatches its 1/world slice of the tokens;
    the shared expert's partial sums are reduce-scattered onto the slices and one all-gather joins them.
    dp: only the MoE layers exchange: "allreduce" gathers every rank's tokens (and their gate values,
    float32, and expert ids, int64) and reduce-scatters the partial sums; "alltoall" sends counts, then
    each pair's token vector, its slots' expert ids (int32) and gate values, and the sums come back.
    """
    e = _nbytes(dtype)
    d, k, w = cfg.hidden_size, cfg.num_experts_per_tok, world_size
    n_layers = cfg.num_hidden_layers
    moe = sum(cfg.is_moe_layer(i) for i in range(n_layers))
    dense = n_layers - moe
    hidden = tokens * d * e
    dispatched = -(-tokens // w) if layout == "tp" else tokens  # tp: each rank dispatches its slice
    if pairs is None:
        pairs = [(dispatched * destinations(cfg, w), dispatched * destinations(cfg, w))] * moe
    if len(pairs) != moe:
        raise ValueError(f"pairs: expected one (sent, received) per MoE layer ({moe}), found {len(pairs)}")
    out = {"all_reduce": 0, "all_gather_into_tensor": 0, "reduce_scatter_tensor": 0, "all_to_all_single": 0}
    if moe_comm == "alltoall":
        for sent, received in pairs:
            out["all_to_all_single"] += w * 8 + sent * (d * e + k * 4 + k * e) + received * d * e
    if layout == "tp":
        out["all_reduce"] = hidden * (1 + n_layers + dense + (moe if moe_comm == "allreduce" else 0))
        out["all_gather_into_tensor"] = rows * (cfg.vocab_size // w) * e
        if moe_comm == "alltoall":
            m = -(-tokens // w)
            out["all_gather_into_tensor"] += moe * m * d * e
            if cfg.n_shared_experts:
                out["reduce_scatter_tensor"] = moe * w * m * d * e
    elif moe_comm == "allreduce":
        out["all_gather_into_tensor"] = moe * (8 + tokens * (d * e + k * max(e, 4) + k * 8))
        out["reduce_scatter_tensor"] = moe * w * hidden
    return {name: b for name, b in out.items() if b}


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
    """The larger activation peak of a prefill pass and a decode step (`activation_bytes`)."""
    reserve: int
    cache_tokens_fit: int
    """Tokens of latent cache the memory left after weights, activations and reserve holds, per GPU."""
    total_tokens_fit: int
    """The same for the whole system: per GPU under dp (each GPU its own sequences), once under tp."""
    derived: int = 0
    """Kept beside the weights, computed from them (see `derived_bytes`)."""
    dtype: torch.dtype = torch.bfloat16
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    mtp: bool = False
    moe_comm: str = "allreduce"

    @property
    def used(self) -> int:
        return self.weights + self.derived + self.cache + self.activations + self.reserve

    @property
    def fits(self) -> bool:
        return self.used <= self.gpu_memory


def plan(cfg: ModelConfig, world_size: int, layout: str = "tp", gemm_impl: str = "fp8",
         gpu_memory_gib: float = 143_771 / 1024, batch_size: int = 1, seq_len: int = 4096,
         prefill_chunk: int = DEFAULT_PREFILL_CHUNK, mtp: bool = False, *, dtype: torch.dtype = torch.bfloat16,
         attn_impl: str = "absorb", moe_comm: str = "allreduce", reserve: int = RESERVE_BYTES) -> MemoryPlan:
    """The per-GPU memory plan (see the module docstring); `dsv3ref.plan` and `python -m dsv3ref plan`.

    batch_size sequences of seq_len positions of cache, prefilled prefill_chunk tokens a pass (the
    pass that sees the whole cache is the largest); mtp: the MTP module loaded (speculative decoding);
    reserve: bytes kept free (a GPU's CUDA context and NCCL buffers; 0 for a CPU).
    """
    for name, value in (("world_size", world_size), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("prefill_chunk", prefill_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive integer, found {value!r}")
    if not gpu_memory_gib > 0:
        raise ValueError(f"gpu_memory_gib: expected a positive number, found {gpu_memory_gib!r}")
    check_choice("layout", layout)
    check_choice("moe_comm", moe_comm)
    check_choice("attn_impl", attn_impl)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype, found {dtype!r}")
    ranks = range(world_size) if world_size <= 64 else (0, world_size - 1)
    try:
        weights = max(weight_bytes(cfg, world_size, r, layout, gemm_impl, mtp, dtype) for r in ranks)
    except ParallelError as e:
        raise ValueError(str(e)) from None
    derived = derived_bytes(cfg, world_size, 0, layout, gemm_impl, attn_impl, dtype, mtp)
    heads = cfg.num_attention_heads // world_size if layout == "tp" else cfg.num_attention_heads
    per_token = cache_bytes_per_token(cfg, dtype, attn_impl, heads, mtp)
    rows = batch_size if layout == "tp" else math.ceil(batch_size / world_size)
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    cache = rows * seq_len * per_token + layers * rows * 8  # and how far each row's cache is filled, per layer
    width = min(chunk_width(rows, prefill_chunk), seq_len)
    # attn_order "auto" expands the keys for a prefill pass where that is cheaper, if the weights are
    # dense and the dtype float32 or wider (see dsv3ref.mla); decode steps stay absorbed
    expanded = (attn_impl == "absorb" and gemm_impl == "bf16" and dtype.itemsize >= 4 and not absorbed_is_cheaper(
        width, seq_len, cfg.kv_lora_rank, heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim))
    activations = max(activation_bytes(cfg, world_size, layout, rows * width, rows, seq_len, dtype, moe_comm,
                                       expanded),
                      activation_bytes(cfg, world_size, layout, rows, rows, seq_len, dtype, moe_comm))
    memory = int(gpu_memory_gib * GIB)
    left = memory - weights - derived - activations - reserve
    fit = max(left // per_token, 0)
    return MemoryPlan(world_size=world_size, layout=layout, gemm_impl=gemm_impl, batch_size=batch_size,
                      seq_len=seq_len, gpu_memory=memory, weights=weights, cache=cache, activations=activations,
                      reserve=reserve, cache_tokens_fit=fit,
                      total_tokens_fit=fit * (world_size if layout == "dp" else 1), derived=derived, dtype=dtype,
                      prefill_chunk=prefill_chunk, mtp=mtp, moe_comm=moe_comm)


def machine_table(cfg: ModelConfig, batch_size: int = 32, seq_len: int = 4096, *, layouts: str | None = None,
                  gemm_impl: str | None = None, dtype: torch.dtype = torch.bfloat16,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK, moe_comm: str | None = None,
                  gpu_memory_gib: float | None = None) -> list[dict]:
    """The plan on each of MACHINES: one dict per (machine, layout) row, layout "tp" with the all-reduce
    exchange and "dp" with the all-to-all (or only `layouts`, with `moe_comm`); each machine's GEMMs, or
    gemm_impl. gpu_memory_gib: instead of MACHINES, nodes of 8 GPUs of that memory (8, 16 and 32 GPUs).
    Sizes in GiB (2^30 bytes), the unit the GPUs report their memory in."""
    if gpu_memory_gib is None:
        machines = [(name, nodes * per_node, GPU_MEMORY[gpu] / GIB, gemm)
                    for name, nodes, per_node, gpu, gemm in MACHINES]
    else:
        machines = [(f"{n // 8}x8 {gpu_memory_gib:.1f} GiB", n, gpu_memory_gib, "fp8") for n in (8, 16, 32)]
    rows = []
    for name, world, gib, gemm in machines:
        for layout in (layouts,) if layouts else ("tp", "dp"):
            comm = moe_comm or ("alltoall" if layout == "dp" else "allreduce")
            p = plan(cfg, world, layout, gemm_impl or gemm, gib, batch_size, seq_len, prefill_chunk, dtype=dtype,
                     moe_comm=comm)
            rows.append({"machine": name, "gemm_impl": gemm_impl or gemm, "layout": layout, "moe_comm": comm,
                         "weights_gib": p.weights / GIB, "cache_gib": p.cache / GIB,
                         "activations_gib": (p.activations + p.derived) / GIB, "used_gib": p.used / GIB,
                         "gpu_gib": p.gpu_memory / GIB, "tokens_fit_per_gpu": p.cache_tokens_fit,
                         "tokens_fit_total": p.total_tokens_fit, "fits": p.fits})
    return rows


def format_table(rows: list[dict]) -> str:
    """machine_table's rows as a fixed-width text table (GiB)."""
    head = (f"{'machine':16} {'gemm':4} {'layout':6} {'exchange':9} {'weights':>8} {'cache':>6} {'act.':>5} "
            f"{'used':>6} {'GPU':>6} "
            f"{'cache tokens/GPU':>17} {'cache tokens, all':>18}  fits")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['machine']:16} {r['gemm_impl']:4} {r['layout']:6} {r['moe_comm']:9} {r['weights_gib']:8.1f} "
                     f"{r['cache_gib']:6.1f} {r['activations_gib']:5.1f} {r['used_gib']:6.1f} {r['gpu_gib']:6.1f} "
                     f"{r['tokens_fit_per_gpu']:17,} {r['tokens_fit_total']:18,}  {'yes' if r['fits'] else 'NO'}")
    return "\n".join(lines)
