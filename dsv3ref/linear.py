"""`Linear`: torch's nn.Linear, less its own random initialization on the meta device."""

from __future__ import annotations

from torch import nn


class Linear(nn.Linear):
    """nn.Linear, except that on the meta device it skips drawing its Kaiming-uniform weights.

    dsv3ref's models draw their own weights (`DeepseekV3.reset_parameters`), and loading builds the
    model on the meta device, where a draw computes nothing but still costs its Python and dispatch
    (about 0.1-0.3 ms a layer: a second or more for the 44,000 expert layers of DeepSeek-V3). On a real
    device the draw is kept, so a seeded model's random weights are what they always were (the draw
    advances the random generator).
    """

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()
