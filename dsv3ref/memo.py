"""Values derived from a tensor, made once per value the tensor takes.

Several parts of dsv3ref derive something from a tensor that many calls then read:

| tensor | derived value | read by |
|---|---|---|
| an attention mask | its additive bias, whether it is plainly causal (`mla`) | every layer of one forward |
| an FP8 layer's master weight | its E4M3 128 x 128 blocks (`train.fp8`) | every micro-batch of one optimizer step |
| an activation | its FP8 tiles (`train.fp8`) | every FP8 layer that reads it (gate_proj and up_proj) |
| FP8 weight blocks | their float64 or dequantized form (`train.fp8`) | every micro-batch of one step |

`derived(tensor, what, make)` makes the value on the first call and returns it while the tensor keeps
its value: the same tensor object (by identity, not by equal numbers) with its version counter
unmoved. A change in place (an optimizer step, `mul_`) moves the counter and the next call makes the
value again. The value goes when the tensor is garbage-collected (so it must not hold the tensor
itself). A tensor made in inference mode keeps no version counter, so nothing is kept for it:
`make()` runs at every call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar("T")

_KEPT = WeakIdKeyDictionary()  # tensor -> {what: (the tensor's version when made, value)}


def derived(tensor: torch.Tensor, what: Hashable, make: Callable[[], T]) -> T:
    """make(), kept with `tensor` under the key `what` while the tensor keeps its value (see above)."""
    if tensor.is_inference():
        return make()
    kept = _KEPT.get(tensor)
    if kept is None:
        kept = _KEPT[tensor] = {}
    entry = kept.get(what)
    if entry is None or entry[0] != tensor._version:
        entry = kept[what] = tensor._version, make()
    return entry[1]
