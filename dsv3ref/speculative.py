"""Self-speculative decoding with the model's own MTP modules (DeepSeek-V3 report, section 5.4.3).

At each step the MTP modules draft the next D tokens (module k drafts token p+k from module k-1's
hidden state); the main model then runs once over [last token, drafts] and keeps the drafts up to
the first one it disagrees with, plus one token of its own (the correction, or a bonus token if all
were accepted). Greedy drafts are accepted iff they equal the main model's argmax, so the output is
exactly plain greedy decoding. With sampling, draft x ~ q is accepted with probability
min(1, p(x)/q(x)), and a rejected one is replaced by a sample of norm(max(0, p - q)) (Leviathan et
al. 2023; Chen et al. 2023): the output distribution is that of plain sampling. "Rolling back" the
cache needs no copy: entries are indexed by position, so the rejected positions are masked until
they are overwritten.
"""

from __future__ import annotations

import time

import torch

from dsv3ref.cache import KVCache
from dsv3ref.prefill import DEFAULT_PREFILL_CHUNK, chunk_width, prefill
from dsv3ref.sampling import Sampler


def verify(drafts: list[int], draft_probs: list[torch.Tensor], target: torch.Tensor, sampler: Sampler
           ) -> tuple[int, int]:
    """Speculative verification: how many drafts to keep, and the token that follows them.

    drafts[j] was drawn from draft_probs[j] (vocab,); target (D + 1, vocab) holds the main model's
    distribution at each draft's position and one beyond. Draft j is kept with probability
    min(1, p(d) / q(d)) (greedy: iff it is p's argmax); at the first rejection the token is drawn from
    norm(max(0, p - q)), the part of p that q under-proposes, so that kept and resampled tokens
    together follow p exactly. If every draft is kept, a bonus token is drawn from p at D + 1.
    """
    for j, d in enumerate(drafts):
        ratio = (target[j, d] / draft_probs[j][d]).item()
        if sampler.temperature == 0 and ratio >= 1 or sampler.temperature > 0 and sampler.uniform() < ratio:
            continue
        if sampler.temperature == 0:
            return j, int(target[j].argmax())
        residual = (target[j] - draft_probs[j]).clamp(min=0)  # (vocab,)
        return j, int(sampler.draw((residual / residual.sum())[None])[0])
    return len(drafts), int(sampler.draw(target[len(drafts)][None])[0])


def speculative_decode(model, prompt: list[int], max_new_tokens: int, sampler: Sampler, eos: set[int],
                       emit, main_pass=None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                       cache_length: int | None = None, cache_kind: str = "static"
                       ) -> tuple[list[int], bool, dict, KVCache]:
    """Self-speculative decoding of one sequence (see the module docstring).

    main_pass: the main model's pass over [token, drafts], `model.hidden_states` (or a compiled copy).
    prefill_chunk: positions the prompt's prefill, and the MTP modules' first window over it, take per pass.
    cache_length: positions of cache to allocate (default: what this sequence needs, prompt + new tokens +
    depth); a compiled main_pass is specialized to it, so generate(compile=True) rounds it up.
    cache_kind: "static" or "paged" (see `DeepseekV3.new_cache`).

    State between steps: tokens t_0..t_p are decided, the main model has processed positions < p
    (t_p is its next input), `main_hidden` holds its final-norm hidden states h^0 for those positions,
    and the MTP caches are final for positions < `mtp_from`.
    """
    depth = len(model.mtp_layers)
    main_pass = main_pass or model.hidden_states
    device, n_prompt = model.device, len(prompt)
    length = max(cache_length or 0, n_prompt + max_new_tokens + depth)
    cache = model.new_cache(1, length, kind=cache_kind)
    main_hidden = torch.zeros(1, length, model.config.hidden_size, dtype=model.dtype, device=device)

    start = time.perf_counter()

    def keep(p0: int, hidden: torch.Tensor) -> None:
        main_hidden[:, p0:p0 + hidden.shape[1]] = hidden

    prefill(model.hidden_states, torch.tensor([prompt], device=device), cache, prefill_chunk, keep=keep)
    seq = list(prompt) + [int(sampler(model.lm_head(main_hidden[:, n_prompt - 1]))[0])]
    prefill_s = time.perf_counter() - start
    out = [seq[-1]]
    done = emit(seq[-1])
    p, mtp_from, passes, drafted, accepted = n_prompt, 0, 1, 0, 0
    start = time.perf_counter()
    while not done and len(out) < max_new_tokens:
        # Draft: module k at positions mtp_from..p-1 reads h^{k-1} and t_{i+k}; its last position drafts t_{p+k}.
        drafts, draft_probs = [], []
        h = main_hidden[:, mtp_from:p]  # (1, w, d)
        for k in range(1, depth + 1):
            known = seq + drafts  # t_0 .. t_p, then the drafts t_{p+1} ..
            next_ids = torch.tensor([known[mtp_from + k:p + k]], device=device)  # t_{i+k} for i in the window
            width = chunk_width(1, prefill_chunk)  # the first window spans the prompt: in passes
            h = torch.cat([model.mtp_hidden_states(k, h[:, i:i + width], next_ids[:, i:i + width], cache,
                                                   start_pos=mtp_from + i) for i in range(0, h.shape[1], width)], 1)
            q = sampler.probs(model.mtp_logits(k, h[:, -1]))  # (1, vocab)
            drafts.append(int(sampler.draw(q)[0]))
            draft_probs.append(q[0])
        mtp_from = max(0, p - depth)  # positions below are final: all their t_{i+k} are decided
        # Verify: one main-model pass over [t_p, drafts]; its logits at j predict t_{p+j+1}.
        hv = main_pass(torch.tensor([[seq[p]] + drafts], device=device), cache, torch.tensor([p], device=device))
        target = sampler.probs(model.lm_head(hv[0]))  # (depth + 1, vocab)
        passes += 1
        drafted += depth
        n_ok, extra = verify(drafts, draft_probs, target, sampler)
        accepted += n_ok
        main_hidden[:, p:p + n_ok + 1] = hv[:, :n_ok + 1]
        for tok in drafts[:n_ok] + [extra]:
            seq.append(tok)
            out.append(tok)
            done = emit(tok)
            if done or len(out) == max_new_tokens:
                break
        p += n_ok + 1
    stats = {"prefill_seconds": prefill_s, "decode_seconds": time.perf_counter() - start, "forward_passes": passes,
             "sequence_forwards": passes, "drafted_tokens": drafted, "accepted_tokens": accepted}
    return out, done, stats, cache
