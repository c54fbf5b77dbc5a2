"""dsv3ref.memo.derived: a value made once per value a tensor takes, by identity and version counter.

Its users (the mask's bias and causal check in test_mla, FP8 weights and activation tiles in
test_train) test it through their own behaviour; this file holds the rule itself to what its docstring
promises, counting the calls of `make`."""

from __future__ import annotations

import gc
import weakref

import torch

from dsv3ref.memo import derived


class Maker:
    """make() for derived: the tensor's sum (the value a stale memo would get wrong), counting calls."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.calls = tensor, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.tensor.sum()


def test_a_value_is_made_once_and_again_after_a_change_in_place():
    t = torch.arange(6.0)
    make = Maker(t)
    first = derived(t, "sum", make)
    assert derived(t, "sum", make) is first and make.calls == 1
    t.mul_(2)  # in place: the version counter moves
    assert derived(t, "sum", make).item() == 30.0 and make.calls == 2
    t[0] = 100.0  # an indexed write moves it too
    assert derived(t, "sum", make).item() == 130.0 and make.calls == 3
    assert derived(t, "sum", make).item() == 130.0 and make.calls == 3


def test_values_are_kept_by_identity_and_under_their_own_keys():
    t, twin = torch.arange(6.0), torch.arange(6.0)  # equal numbers, another object
    make, make_twin = Maker(t), Maker(twin)
    derived(t, "sum", make)
    derived(twin, "sum", make_twin)
    assert make.calls == 1 and make_twin.calls == 1
    assert derived(t, ("sum", torch.float64), lambda: t.double().sum()).dtype == torch.float64
    assert derived(t, "sum", make).dtype == torch.float32 and make.calls == 1


def test_an_inference_tensor_keeps_nothing():
    with torch.inference_mode():
        t = torch.arange(6.0)
    make = Maker(t)
    derived(t, "sum", make)
    derived(t, "sum", make)
    assert make.calls == 2  # no version counter to tell a change: made at every call


def test_the_value_goes_with_the_tensor():
    t = torch.arange(6.0)
    value = derived(t, "big", lambda: torch.zeros(1000))
    gone = weakref.ref(value)
    del value, t
    gc.collect()
    assert gone() is None
