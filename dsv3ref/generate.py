"""Text generation over the static KV cache: batched, greedy or sampled, stopping on EOS per row.

Prompts of different lengths are right-padded into one batch and prefilled together; from then on
each row decodes at its own position (`start_pos` is a per-row tensor), so a row's keys sit at the
same cache indices, and it sees exactly the same keys, as when it is generated alone. Padding
written past a row's end is never attended (the causal mask hides every index beyond the query's
position) and is overwritten by the row's next tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dsv3ref.model import DeepseekV3


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
    """prefill_seconds, decode_seconds, forward_passes, generated_tokens."""

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
    return [list(map(int, row.tolist() if isinstance(row, torch.Tensor) else row)) for row in input_ids]


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p; -inf elsewhere."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass ranked above each token
        drop_sorted = before >= top_p  # never drops the most likely token (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


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
) -> Generation:
    """Generate up to `max_new_tokens` tokens after each prompt.

    input_ids: a (batch, seq) tensor (padded rows marked by attention_mask) or a list of token lists.
    temperature 0 is greedy (argmax, deterministic); otherwise tokens are sampled from
    softmax(logits / temperature) restricted by top_k (0: off) and top_p (1.0: off), reproducibly
    for a given `seed`. eos_token_id: id or ids that end a row; None takes the config's
    eos_token_id, [] never stops early. stream: called after every step with one entry per row,
    the new token or None for rows already finished.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: expected a positive integer, found {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0, found {temperature!r}")
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
    longest = max(map(len, prompts))
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                         f"exceeds max_position_embeddings={limit}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    device, batch = model.device, len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (b,)
    padded = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = torch.tensor(p, device=device)
    cache = model.new_cache(batch, longest + max_new_tokens)

    start = time.perf_counter()
    hidden = model.hidden_states(padded, cache, 0)  # (b, longest, dim)
    logits = model.lm_head(hidden[torch.arange(batch, device=device), lengths - 1])  # (b, vocab)
    prefill_s = time.perf_counter() - start
    positions = lengths.clone()  # where each row's next token goes
    tokens: list[list[int]] = [[] for _ in prompts]
    finished = [False] * batch
    passes = 1
    start = time.perf_counter()
    for step in range(max_new_tokens):
        if temperature == 0:
            next_ids = logits.argmax(dim=-1)  # (b,)
        else:
            probs = _filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
            next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
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
        logits = model(next_ids[:, None], cache, start_pos=positions)[:, -1]
        positions += 1
        passes += 1
    stats = {"prefill_seconds": prefill_s, "decode_seconds": time.perf_counter() - start,
             "forward_passes": passes, "generated_tokens": sum(map(len, tokens))}
    return Generation(prompts=prompts, tokens=tokens, finished=finished, stats=stats)
