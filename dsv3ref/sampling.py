"""Turning logits into tokens: greedy, or a seeded draw from a temperature-scaled, top-k/top-p
filtered softmax. Plain and speculative decoding share one `Sampler`."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
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


class Sampler:
    """Turns logits into tokens: argmax at temperature 0, else a seeded draw from the filtered softmax."""

    def __init__(self, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a token is drawn from, (..., vocab) float32+ (one-hot at temperature 0)."""
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("generate: the model's logits are not finite (NaN or Inf), so no token can be "
                                     "chosen; the weights or the model's arithmetic produce non-finite values")
        if self.temperature == 0:
            return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        # Shifted by the row's maximum first (the softmax and the filters do not change): the largest
        # logit becomes 0, so a temperature small enough to overflow a plain division still gives a
        # distribution (all on the most likely tokens) instead of NaN.
        logits = logits.float()
        scaled = (logits - logits.amax(-1, keepdim=True)) / self.temperature
        return filter_logits(scaled, self.top_k, self.top_p).softmax(-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """A token per row of probs (b, vocab) -> (b,)."""
        if self.temperature == 0:
            return probs.argmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.draw(self.probs(logits))

    def uniform(self) -> float:
        """A draw from U(0, 1) from the same generator."""
        device = self.generator.device if self.generator is not None else "cpu"
        return torch.rand((), generator=self.generator, device=device).item()
