"""The whole DeepSeek-V3 language model: embedding, decoder layers, final norm, LM head."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dsv3ref.block import DecoderLayer
from dsv3ref.cache import KVCache, cache_shapes
from dsv3ref.checkpoint import LoadReport, load_pretrained
from dsv3ref.config import ModelConfig
from dsv3ref.fp8 import FP8Linear, quantize_weight, replace_fp8_layers
from dsv3ref.impl import Implementation
from dsv3ref.linear import Linear
from dsv3ref.mtp import DEFAULT_MTP_LAMBDA, MTPLayer, mtp_loss
from dsv3ref.norm import RMSNorm
from dsv3ref.paged_cache import PagedKVCache
from dsv3ref.rope import RotaryEmbedding


class DeepseekV3Body(nn.Module):
    """What the checkpoint calls `model.*`: `embed_tokens`, `layers.{i}`, `norm`.

    `layers` holds the num_hidden_layers decoder layers followed by the num_nextn_predict_layers MTP
    modules, which the checkpoint stores as further layers (`model.layers.61` in DeepSeek-V3).
    """

    def __init__(self, cfg: ModelConfig, impl: Implementation):
        super().__init__()
        n = cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i, impl) for i in range(n)]
            + [MTPLayer(cfg, n + k, impl) for k in range(cfg.num_nextn_predict_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3(nn.Module):
    """DeepSeek-V3 causal language model.

    `DeepseekV3(cfg)` builds it with random weights (normal, std = cfg.initializer_range; norms at
    one; router bias at zero); `DeepseekV3.from_pretrained(path)` loads a Hugging Face-format
    checkpoint. Parameter names equal the checkpoint's tensor names.

    How it computes is `model.impl` (a `dsv3ref.impl.Implementation`), given as keywords:
    attn_impl "naive" (expand per-head K/V from the latent) or "absorb" (attend in latent space),
    attn_order for "absorb" ("auto", "absorbed", "expanded"), moe_impl "loop" or "grouped",
    gemm_impl "bf16" or "fp8" (the layers the release stores in FP8 become `FP8Linear`: block-scaled
    E4M3 weights, quantized from the random initialization here, read as they are by from_pretrained)
    and fp8_kernel "emulate", "dequantize" or "scaled_mm"; or as impl=Implementation(...).
    The num_nextn_predict_layers MTP modules follow the decoder layers (see dsv3ref.mtp).
    """

    def __init__(self, cfg: ModelConfig, attn_impl: str = "naive", moe_impl: str = "loop", attn_order: str = "auto",
                 gemm_impl: str = "bf16", fp8_kernel: str = "emulate", *, impl: Implementation | None = None):
        super().__init__()
        if impl is None:
            impl = Implementation(attn_impl=attn_impl, attn_order=attn_order, moe_impl=moe_impl, gemm_impl=gemm_impl,
                                  fp8_kernel=fp8_kernel)
        self.config = cfg
        self.impl = impl
        self.load_report: LoadReport | None = None
        """What from_pretrained found (source, unused tensors, notes); None for a model built here."""
        self.parallel = None
        """The parallel plan applied to this model (dsv3ref.parallel.parallelize); None in a single process."""
        self.compiled_steps: dict = {}
        """This model's forward passes under torch.compile, built on first use by
        dsv3ref.generate.compiled_steps (generate(..., compile=True)) and kept for later calls."""
        self.model = DeepseekV3Body(cfg, impl)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        if impl.gemm_impl == "fp8":
            self._fp8_layers()
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _fp8_layers(self) -> None:
        """Replace every linear layer whose weight the release stores in FP8 (fp8.FP8_WEIGHT) by an FP8Linear."""
        qc = self.config.quantization_config or {}
        scale_fmt = qc.get("scale_fmt", self.config.extra.get("scale_fmt"))
        replace_fp8_layers(self, lambda layer: FP8Linear(layer.in_features, layer.out_features, scale_fmt,
                                                        kernel=self.impl.fp8_kernel))

    @property
    def attn_impl(self) -> str:
        return self.impl.attn_impl

    @property
    def moe_impl(self) -> str:
        return self.impl.moe_impl

    @property
    def gemm_impl(self) -> str:
        return self.impl.gemm_impl

    @property
    def unused_tensors(self) -> list[str]:
        """Shortcut to load_report.unused_tensors (empty for a model built here)."""
        return list(self.load_report.unused_tensors) if self.load_report else []

    @property
    def load_notes(self) -> list[str]:
        """Shortcut to load_report.notes (empty for a model built here)."""
        return list(self.load_report.notes) if self.load_report else []

    def set_attn_order(self, attn_order: str) -> None:
        """Switch the order absorbed attention computes chunks in (same weights, same cache)."""
        self.impl = self.impl.replace(attn_order=attn_order)
        for layer in self.model.layers:
            layer.self_attn.attn_order = attn_order

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initialization as in the report: N(0, initializer_range^2) for every matrix.
        (Nothing to do on the meta device, where tensors hold no values: loading builds the model there.)"""
        if self.lm_head.weight.is_meta:
            return
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                nn.init.zeros_(b)
        for module in self.modules():
            if isinstance(module, FP8Linear):
                w = torch.empty(module.weight.shape, device=module.weight.device).normal_(0.0, std)
                q, scale = quantize_weight(w, scale_fmt=module.scale_fmt)
                module.weight.copy_(q)
                module.weight_scale_inv.copy_(scale)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The main model's decoder layers (without the MTP modules)."""
        return self.model.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        """The Multi-Token Prediction modules, depth 1 first (empty when the model has none)."""
        return self.model.layers[self.config.num_hidden_layers:]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Raise a clear error for input that is not (batch, seq) token ids of this vocabulary."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected a torch.Tensor of token ids, found {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (batch, seq), found {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"input_ids: expected an integer tensor, found dtype {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids: the batch is empty (shape[0] == 0)")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids: the sequence is empty (shape[1] == 0)")
        if torch.compiler.is_compiling():
            return  # reading values back would split the graph: compiled calls check shapes and types only
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids: token ids must lie in [0, vocab_size={self.config.vocab_size}), "
                             f"found values in [{lo}, {hi}]")

    def new_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, kind: str = "static", num_blocks: int | None = None
                  ) -> KVCache | PagedKVCache:
        """A zeroed cache for `batch_size` sequences of up to `max_seq_len` positions.

        kind "static" (a `KVCache`): what it holds follows attn_impl, the latent c^KV and k^R for
        "absorb", per-head K and V for "naive". kind "paged" (a `PagedKVCache`, attn_impl "absorb"):
        the latent in pages of 64 positions from a pool of num_blocks pages (default: enough for every
        row at max_seq_len), attended through the FlashMLA-shaped op. dtype and device follow the model
        unless given.
        """
        if kind == "paged":
            if self.attn_impl != "absorb":
                raise ValueError(f"kind='paged' pages the latent cache of attn_impl='absorb'; this model computes "
                                 f"attn_impl={self.attn_impl!r}")
            return PagedKVCache(self.config, batch_size, max_seq_len, num_blocks, dtype=dtype or self.dtype,
                                device=device or self.device, n_layers=len(self.model.layers))
        if kind != "static":
            raise ValueError(f"kind: found {kind!r}, expected 'static' or 'paged'")
        return KVCache(self.config, batch_size, max_seq_len, self.attn_impl, dtype=dtype or self.dtype,
                       device=device or self.device, n_layers=len(self.model.layers), heads=self.attention_heads)

    @property
    def attention_heads(self) -> int:
        """The attention heads this process computes: all of them, or its share when a parallel plan
        splits them (the naive cache holds keys and values of these heads)."""
        return self.model.layers[0].self_attn.n_heads

    def _check_cache(self, cache: KVCache | PagedKVCache, b: int) -> None:
        """Raise a clear error for a cache that was not made by this model's `new_cache`."""
        if isinstance(cache, PagedKVCache):
            width = self.config.kv_lora_rank + self.config.qk_rope_head_dim
            expected = (self.attn_impl, len(self.model.layers), (1, width), b)
            if ("absorb", len(cache.layers), cache.shapes()["kv"][2:], cache.batch_size) != expected:
                raise ValueError(f"cache: a paged cache of {len(cache.layers)} layers of {cache.shapes()['kv']} for "
                                 f"batch {cache.batch_size}; this model (attn_impl={self.attn_impl!r}) needs "
                                 f"attn_impl='absorb', {len(self.model.layers)} layers of (blocks, page, 1, {width}) "
                                 f"and batch {b} (make it with model.new_cache(..., kind='paged'))")
        elif not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache or PagedKVCache (model.new_cache), found "
                            f"{type(cache).__name__}")
        else:
            if cache.attn_impl != self.attn_impl:
                raise ValueError(f"cache: made for attn_impl={cache.attn_impl!r}, this model computes attn_impl="
                                 f"{self.attn_impl!r} (make it with model.new_cache)")
            if cache.batch_size != b:
                raise ValueError(f"cache: made for batch_size={cache.batch_size}, input_ids has batch {b}")
            shapes = cache_shapes(self.config, cache.attn_impl, cache.batch_size, cache.max_seq_len,
                                  self.attention_heads)
            if len(cache.layers) != len(self.model.layers) or cache.shapes() != shapes:
                raise ValueError(f"cache: made for another config ({len(cache.layers)} layers of {cache.shapes()}); "
                                 f"this model needs {len(self.model.layers)} layers of {shapes} (make it with "
                                 "model.new_cache)")
        if cache.dtype != self.dtype or cache.device != self.device:
            raise ValueError(f"cache: holds {cache.dtype} on {cache.device}, the model computes in {self.dtype} on "
                             f"{self.device} (make it with model.new_cache)")

    def _positions(self, input_ids: torch.Tensor, cache: KVCache | None, start_pos, layer: int = 0) -> torch.Tensor:
        """(b, t) absolute positions of the chunk; checks them against the limits, and against what
        cache layer `layer` (the first one the chunk goes through) holds already."""
        b, t = input_ids.shape
        if isinstance(start_pos, torch.Tensor):
            if start_pos.dtype.is_floating_point or start_pos.dtype.is_complex or start_pos.dtype == torch.bool:
                raise TypeError(f"start_pos: expected an integer tensor, found dtype {start_pos.dtype}")
        elif isinstance(start_pos, bool) or not isinstance(start_pos, int):
            raise TypeError(f"start_pos: expected an int or an integer tensor of shape ({b},), found {start_pos!r}")
        start = torch.as_tensor(start_pos, dtype=torch.long, device=input_ids.device)
        if start.dim() > 1 or (start.dim() == 1 and start.shape[0] != b):
            raise ValueError(f"start_pos: expected an int or a tensor of shape ({b},), found shape "
                             f"{tuple(start.shape)}")
        positions = start.reshape(-1, 1) + torch.arange(t, device=input_ids.device)  # (b or 1, t)
        positions = positions.expand(b, t)
        if torch.compiler.is_compiling():
            return positions  # the checks below read values back or compare shapes: eager calls only
        if int(positions.min()) < 0:
            raise ValueError(f"start_pos: positions must be >= 0, found start_pos={start.tolist()}")
        end = int(positions.max()) + 1
        if end > self.config.max_position_embeddings:
            raise ValueError(f"input_ids: positions up to {end - 1} exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if cache is not None:
            self._check_cache(cache, b)
            if end > cache.max_seq_len:
                raise ValueError(f"cache: positions up to {end - 1} requested, but the cache holds "
                                 f"max_seq_len={cache.max_seq_len} positions")
            gap = positions[:, 0] > cache.filled[layer].to(positions.device)  # (b,)
            if bool(gap.any()):
                row = int(gap.nonzero()[0])
                raise ValueError(f"start_pos: row {row} starts at position {int(positions[row, 0])}, but the cache "
                                 f"holds only its first {int(cache.filled[layer, row])} positions; feed the tokens "
                                 "before it first (its attention would read empty cache slots)")
        return positions

    def _attention_inputs(self, input_ids, cache, start_pos, dtype, layer: int = 0):
        """positions (b, t), cos/sin (b, t, rope/2) and the mask for a chunk (see `MLA.forward`)."""
        positions = self._positions(input_ids, cache, start_pos, layer)  # (b, t)
        if isinstance(cache, PagedKVCache):
            cache.reserve(positions)  # the pages these positions reach, before any layer writes
        cos, sin = self.rotary(positions, dtype)  # (b, t, rope/2) each
        if cache is None:  # keys are the chunk itself
            mask = rearrange(positions, "b s -> b 1 s") <= rearrange(positions, "b t -> b t 1")  # (b, t, t)
        else:  # keys are cache indices 0 .. end-1, index = position
            # Compiled, every index of the cache is a key (masked beyond each query's position), so that
            # the shapes, and the graph, do not change from one decode step to the next.
            end = cache.max_seq_len if torch.compiler.is_compiling() else int(positions.max()) + 1
            keys = torch.arange(end, device=input_ids.device)
            mask = rearrange(keys, "s -> 1 1 s") <= rearrange(positions, "b t -> b t 1")  # (b, t, end)
        return positions, cos, sin, mask

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """The final-norm output (b, t, dim) for a chunk of tokens (see `forward`): what the LM head
        reads, and the h^0 that the MTP modules take."""
        self.check_input_ids(input_ids)
        x = self.model.embed_tokens(input_ids.long())  # (b, t, dim)
        positions, cos, sin, mask = self._attention_inputs(input_ids, cache, start_pos, x.dtype)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, cos, sin, mask, positions, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.mark_filled(range(self.config.num_hidden_layers), positions)
        return self.model.norm(x)

    def mtp_hidden_states(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor,
                          cache: KVCache | None = None, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """MTP module `depth` (1-based): h^{depth-1} (b, t, dim) at positions start_pos.. and the tokens
        t_{i+depth} (b, t) -> h^depth (b, t, dim). Its logits are `mtp_logits(depth, h)`."""
        if not 1 <= depth <= len(self.mtp_layers):
            raise ValueError(f"depth: expected 1..{len(self.mtp_layers)} (the model's MTP modules), found {depth}")
        self.check_input_ids(next_ids)
        if hidden.shape[:2] != next_ids.shape:
            raise ValueError(f"hidden: expected shape {tuple(next_ids.shape)} + (dim,) like next_ids, found "
                             f"{tuple(hidden.shape)}")
        layer = self.mtp_layers[depth - 1]
        index = self.config.num_hidden_layers + depth - 1  # its place in model.layers and in the cache
        embeds = self.model.embed_tokens(next_ids.long())
        positions, cos, sin, mask = self._attention_inputs(next_ids, cache, start_pos, embeds.dtype, index)
        out = layer(hidden, embeds, cos, sin, mask, positions, None if cache is None else cache.layers[index])
        if cache is not None:
            cache.mark_filled(range(index, index + 1), positions)
        return out

    def mtp_logits(self, depth: int, mtp_hidden: torch.Tensor) -> torch.Tensor:
        """Logits (b, t, vocab) of MTP module `depth` from its output h^depth: the shared head after
        the module's own shared_head.norm (eq. 23)."""
        return self.lm_head(self.mtp_layers[depth - 1].shared_head.norm(mtp_hidden))

    def loss(self, input_ids: torch.Tensor, mtp_lambda: float = DEFAULT_MTP_LAMBDA) -> dict[str, torch.Tensor]:
        """Training losses on token sequences input_ids (b, T): next-token cross-entropy of the main
        model, plus the MTP objective of eqs. 24-25 (`dsv3ref.mtp.mtp_loss`).

        Returns {"loss": main + mtp, "main": ..., "mtp": lambda / D * sum_k L^k, "mtp_per_depth": (D,)}.
        """
        depth_count = len(self.mtp_layers)
        if input_ids.shape[1] < depth_count + 2:
            raise ValueError(f"input_ids: {input_ids.shape[1]} tokens are too few for {depth_count} MTP depth(s); "
                             f"expected at least {depth_count + 2}")
        h = self.hidden_states(input_ids)  # (b, T, d), h^0
        main = F.cross_entropy(rearrange(self.lm_head(h[:, :-1]), "b t v -> (b t) v"),
                               rearrange(input_ids[:, 1:], "b t -> (b t)").long())
        mtp, per_depth = mtp_loss(self, h, input_ids, mtp_lambda)
        return {"loss": main + mtp, "main": main, "mtp": mtp, "mtp_per_depth": per_depth}

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """input_ids (batch, seq) int -> logits (batch, seq, vocab_size), causal.

        Without a cache the sequence is processed on its own. With a cache (`new_cache`), the tokens
        sit at positions start_pos, start_pos + 1, ...: their keys are written into the cache and
        they attend to everything cached before them (prefill with start_pos=0, then decode one
        token at a time). start_pos may be a (batch,) tensor to give each row its own position.
        """
        return self.lm_head(self.hidden_states(input_ids, cache, start_pos))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        attn_impl: str = "naive",
        moe_impl: str = "loop",
        gemm_impl: str = "bf16",
        fp8_kernel: str = "auto",
        check_finite: bool = True,
        attn_order: str = "auto",
        mtp: bool | None = None,
        mmap: bool = True,
    ) -> DeepseekV3:
        """Load a checkpoint folder (config.json + model.safetensors or shards with an index).

        The defaults are the oracle's: float32, the readable paths, an FP8 checkpoint dequantized on
        load (gemm_impl "bf16"). gemm_impl "fp8" keeps FP8 weights in FP8 and runs the block-scaled
        FP8 GEMM (see dsv3ref.fp8), emulated exactly (fp8_kernel "emulate"), as one GEMM of the
        dequantized FP8 operands ("dequantize": float32 rounding apart, the same result, faster) or through
        torch's scaled_mm ("scaled_mm": a CPU, or an SM90 GPU); "auto" (gemm_impl, fp8_kernel, moe_impl, and
        dtype) lets loading decide from the checkpoint and the device (dsv3ref.impl). mtp: load the MTP
        modules (None: as config.json says; False: leave them unread). The other keywords are the
        model's (see the class docstring); `model.load_report` says what loading found.

        Names, shapes and dtypes are checked from the file headers before any weight memory is
        allocated; every weight is checked to be finite as it is read (a streaming reduction;
        check_finite=False skips it).

        mmap: on a CPU, a weight stored in the dtype asked for is not copied: the parameter is the
        file's bytes, mapped copy-on-write as safetensors maps them (as HF transformers' loader does),
        so the page cache holds the only copy and the finite check is the one pass over the data;
        writing to a parameter copies its page. Keep the files unchanged while the model lives
        (save_pretrained writes a new file and renames it, which is safe); mmap=False copies every
        weight into memory the model owns. Measured on a 0.93 GiB float32 checkpoint in the page cache
        (benchmarks/io.py, docs/benchmarks.md, one thread of a 2-core Xeon): with the finite check, the
        load takes 0.7-1.1x the time of reading every tensor into memory once and runs 1.4-3.4x as fast
        as HF's loader (four runs); the check is two thirds of it; mmap=False takes 2.2-2.4x that read.
        """
        return load_pretrained(cls, path, dtype=dtype, device=device, attn_impl=attn_impl, attn_order=attn_order,
                               moe_impl=moe_impl, gemm_impl=gemm_impl, fp8_kernel=fp8_kernel, mtp=mtp,
                               check_finite_values=check_finite, mmap=mmap)
