"""Text generation over the static KV cache: batched, greedy or sampled, stopping on EOS per row,
optionally with self-speculative decoding by the model's own MTP modules.

Prompts of different lengths are right-padded into one batch and prefilled together, in chunks of
at most `prefill_chunk` tokens (rows x positions: the attention scores and the experts' buffers of one
pass stay bounded however long the prompts; the logits do not depend on the chunking); from then on
each row decodes at its own position (`start_pos` is a per-row tensor), so a row's keys sit at the
same cache indices, and it sees exactly the same keys, as when it is generated alone. Padding
written past a row's end is never attended (the causal mask hides every index beyond the query's
position) and is overwritten by the row's next tokens.

`speculative=True` decodes with the model's own MTP modules as drafters (see dsv3ref.speculative);
tokens are chosen by a `dsv3ref.sampling.Sampler`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dsv3ref.cache import KVCache
from dsv3ref.model import DeepseekV3
from dsv3ref.prefill import DEFAULT_PREFILL_CHUNK, chunk_width, prefill
from dsv3ref.sampling import Sampler
from dsv3ref.speculative import speculative_decode


@dataclass
class Generation:
    """What `generate` returns."""

    prompts: list[list[int]]
    """Each row's prompt, without padding."""
    tokens: list[list[int]]
    """Each row's generated tokens, the EOS token included when the row stopped on it."""
    finished: list[bool]
    """Whether the row stopped on EOS (False: it reached max_new_tokens)."""
    stats: dict[str, float] = field(default_factory=dict)
    """prefill_seconds, decode_seconds, forward_passes (of the main model, a batch counting once),
    generated_tokens, tokens_per_forward (tokens a sequence gains per main-model pass: at most 1
    for plain decoding, up to D + 1 with speculation); with speculative decoding also
    drafted_tokens, accepted_tokens and acceptance_rate (accepted / drafted)."""

    @property
    def sequences(self) -> list[list[int]]:
        """Prompt followed by the generated tokens, per row."""
        return [p + t for p, t in zip(self.prompts, self.tokens, strict=True)]


def _prompts(input_ids, attention_mask) -> list[list[int]]:
    """Accept a (batch, seq) tensor (with an optional 0/1 attention_mask marking padding) or a list
    of token-id sequences; return each row's real tokens."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (batch, seq), found {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids: expected integer token ids, found dtype {input_ids.dtype}")
        if attention_mask is None:
            return input_ids.tolist()
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, found "
                             f"{tuple(attention_mask.shape)}")
        rows = []
        for b, (ids, keep) in enumerate(zip(input_ids.tolist(), attention_mask.bool().tolist(), strict=True)):
            idx = [i for i, k in enumerate(keep) if k]
            if idx and idx != list(range(idx[0], idx[-1] + 1)):
                raise ValueError(f"attention_mask: row {b} has padding between tokens; expected left or right "
                                 "padding only")
            rows.append([ids[i] for i in idx])
        return rows
    if attention_mask is not None:
        raise ValueError("attention_mask: only meaningful with a padded input_ids tensor")
    rows = []
    for b, row in enumerate(input_ids):
        if isinstance(row, torch.Tensor):
            if row.dtype.is_floating_point or row.dtype == torch.bool:
                raise TypeError(f"input_ids: row {b} holds dtype {row.dtype}, expected integer token ids")
            row = row.tolist()
        if isinstance(row, (str, bytes)):
            raise TypeError(f"input_ids: row {b} is text ({row[:20]!r}); encode it with a Tokenizer first")
        for i, tok in enumerate(row):
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise TypeError(f"input_ids: row {b}, position {i}: expected an integer token id, found {tok!r}")
        rows.append(list(row))
    return rows


COMPILE_CACHE_BUCKET = 256
"""With compile=True, cache lengths are rounded up to a multiple of this: one decode graph serves every
prompt and max_new_tokens whose total falls in the same bucket (and batch size)."""


def compiled_steps(model: DeepseekV3) -> dict[str, Callable]:
    """The model's forward passes under torch.compile, built once per model and kept on it
    (`model.compiled_steps`), each captured whole (fullgraph=True):

    - "decode": one token per row, `model(ids (b, 1), cache, start_pos (b,) tensor)`: one graph for every
      step, position and row layout (positions are tensors, keys span the whole static cache);
    - "prefill": `model.hidden_states(ids (b, t), cache, start_pos)` with t dynamic: attention and the
      dense layers compiled (at most two graphs, one per attention order that attn_order="auto" picks),
      the routed experts run between them through the grouped GEMM (their sizes depend on the routing);
    - "verify": speculative decoding's pass over [token, D drafts], `model.hidden_states` (1, D + 1).

    On CUDA they use mode="reduce-overhead" (CUDA graphs over the static cache). Compiled calls skip the
    input checks that would read values back to the host; eager calls keep them.
    """
    if not model.compiled_steps:
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        model.compiled_steps.update(
            decode=torch.compile(model, fullgraph=True, dynamic=False, mode=mode),
            prefill=torch.compile(model.hidden_states, dynamic=True),
            verify=torch.compile(model.hidden_states, fullgraph=True, dynamic=False, mode=mode))
    return model.compiled_steps


def compiled_cache_length(model: DeepseekV3, needed: int) -> int:
    """A compiled step is specialized to its cache's size: round `needed` up to COMPILE_CACHE_BUCKET
    (at most max_position_embeddings, never below what is needed), so that calls share graphs."""
    bucketed = -(-needed // COMPILE_CACHE_BUCKET) * COMPILE_CACHE_BUCKET
    return max(needed, min(bucketed, model.config.max_position_embeddings))


def _plain(model: DeepseekV3, prompts: list[list[int]], max_new_tokens: int, sampler: Sampler, eos: set[int],
           stream, compile: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pad_to: int = 0,
           cache_kind: str = "static") -> tuple[list[list[int]], list[bool], dict, KVCache]:
    """Batched decoding, one token per row per forward pass."""
    device, batch = model.device, len(prompts)
    longest = max(max(map(len, prompts)), pad_to)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (b,)
    padded = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = torch.tensor(p, device=device)
    length = longest + max_new_tokens
    if compile:
        length = compiled_cache_length(model, length)
    cache = model.new_cache(batch, length, kind=cache_kind)

    start = time.perf_counter()
    steps = compiled_steps(model) if compile else {"prefill": model.hidden_states, "decode": model}
    last = torch.empty(batch, model.config.hidden_size, dtype=model.dtype, device=device)  # each row's last token

    def keep(p0: int, hidden: torch.Tensor) -> None:
        at = lengths - 1 - p0  # (b,) where each row's last prompt token is in this pass
        rows = torch.where((at >= 0) & (at < hidden.shape[1]))[0]
        last[rows] = hidden[rows, at[rows]]

    prefill(steps["prefill"], padded, cache, prefill_chunk, keep=keep)
    logits = model.lm_head(last)  # (b, vocab)
    prefill_s = time.perf_counter() - start
    positions = lengths.clone()  # where each row's next token goes
    tokens: list[list[int]] = [[] for _ in prompts]
    finished = [False] * batch
    passes = 1
    start = time.perf_counter()
    for step in range(max_new_tokens):
        next_ids = sampler(logits)  # (b,)
        emitted: list[int | None] = []
        for b, tok in enumerate(next_ids.tolist()):
            if finished[b]:
                emitted.append(None)
                continue
            tokens[b].append(tok)
            emitted.append(tok)
            finished[b] = tok in eos
        if stream is not None:
            stream(emitted)
        if all(finished) or step == max_new_tokens - 1:
            break
        logits = steps["decode"](next_ids[:, None], cache, positions)[:, -1]  # positions: a (b,) tensor
        positions += 1
        passes += 1
    stats = {"prefill_seconds": prefill_s, "decode_seconds": time.perf_counter() - start, "forward_passes": passes,
             "sequence_forwards": passes * batch}
    return tokens, finished, stats, cache


@torch.inference_mode()
def generate(
    model: DeepseekV3,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    stream: Callable[[list[int | None]], None] | None = None,
    attention_mask: torch.Tensor | None = None,
    speculative: bool = False,
    compile: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    pad_to: int = 0,
    cache_kind: str = "static",
) -> Generation:
    """Generate up to `max_new_tokens` tokens after each prompt.

    input_ids: a (batch, seq) tensor (padded rows marked by attention_mask) or a list of token lists.
    temperature 0 is greedy (argmax, deterministic); otherwise tokens are sampled from
    softmax(logits / temperature) restricted by top_k (0: off) and top_p (1.0: off), reproducibly
    for a given `seed`. eos_token_id: id or ids that end a row; None takes the config's
    eos_token_id, [] never stops early. stream: called for every new token with one entry per row,
    the new token or None for the other rows. speculative: draft with the model's MTP modules and
    verify with the main model (rows are then decoded one after another); the tokens are those of
    plain decoding (greedy) or follow its distribution (sampling), and `stats` reports the acceptance.
    compile: run the forward passes through torch.compile (`compiled_steps`: captured once per model,
    no recompilation from one decode step to the next); the tokens are those of eager decoding.
    prefill_chunk: tokens (rows x positions) one prefill pass takes at most; the logits do not depend
    on it. pad_to: right-pad the prompts to at least this many positions (the ranks of a data-parallel
    launch pad to one length, so that they prefill in the same number of passes). cache_kind: "static"
    (`KVCache`) or "paged" (`PagedKVCache`, attn_impl "absorb": attention through the FlashMLA-shaped
    op, or the kernel `dsv3ref.kernels.use` names); the tokens do not depend on it beyond rounding.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: expected a positive integer, found {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature: expected a finite number >= 0, found {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a value in (0, 1], found {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0, found {top_k!r}")
    prompts = _prompts(input_ids, attention_mask)
    if not prompts:
        raise ValueError("input_ids: no prompts given")
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"input_ids: prompt {b} is empty")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    depth = len(model.mtp_layers) if speculative else 0
    if speculative and not depth:
        raise ValueError("speculative: the model has no MTP modules (num_nextn_predict_layers=0 or none in the "
                         "checkpoint)")
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 0:
        raise ValueError(f"pad_to: expected an integer >= 0, found {pad_to!r}")
    longest = max(max(map(len, prompts)), pad_to)
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens + depth > limit:
        extra = f" + {depth} draft position(s)" if depth else ""
        raise ValueError(f"max_new_tokens: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens}{extra} "
                         f"exceeds max_position_embeddings={limit}")
    chunk_width(1, prefill_chunk)  # checks it
    if cache_kind not in ("static", "paged"):
        raise ValueError(f"cache_kind: found {cache_kind!r}, expected 'static' or 'paged'")
    if cache_kind == "paged" and compile:
        raise ValueError("cache_kind='paged' with compile=True: compiled decoding is captured over the static cache; "
                         "use one or the other")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"seed: expected an integer in [0, 2**64), found {seed!r}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    sampler = Sampler(temperature, top_k, top_p, generator)

    if not speculative:
        tokens, finished, stats, _ = _plain(model, prompts, max_new_tokens, sampler, eos, stream, compile,
                                            prefill_chunk, pad_to, cache_kind)
    else:
        tokens, finished, totals = [], [], {}
        for row, prompt in enumerate(prompts):
            def emit(tok: int, row: int = row) -> bool:
                if stream is not None:
                    stream([tok if b == row else None for b in range(len(prompts))])
                return tok in eos

            main_pass = compiled_steps(model)["verify"] if compile else model.hidden_states
            needed = len(prompt) + max_new_tokens + len(model.mtp_layers)
            out, done, stats, _ = speculative_decode(model, prompt, max_new_tokens, sampler, eos, emit, main_pass,
                                                     prefill_chunk,
                                                     compiled_cache_length(model, needed) if compile else None,
                                                     cache_kind)
            tokens.append(out)
            finished.append(done)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
        stats = totals
        stats["acceptance_rate"] = stats["accepted_tokens"] / max(stats["drafted_tokens"], 1)
    stats["generated_tokens"] = sum(map(len, tokens))
    stats["tokens_per_forward"] = stats["generated_tokens"] / stats.pop("sequence_forwards")
    return Generation(prompts=prompts, tokens=tokens, finished=finished, stats=stats)
