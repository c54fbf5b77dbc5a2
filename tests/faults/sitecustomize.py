"""Faults for the launch tests (tests/test_launch.py), put on the PYTHONPATH of a torchrun launch:
DSV3REF_TEST_FAULT="slow_load:RANK:SECONDS" makes that rank's first read of tensor data wait SECONDS;
"die_loading:RANK" makes that rank vanish there, "die_generating:RANK" at its first sampled token
(status 0 both, so that torchrun does not stop the others: what the ranks of another node see when
that node is lost); "other_copy:RANK:DIR" makes that rank read --ckpt-path DIR instead (a node whose
copy of the checkpoint differs). Not part of dsv3ref: a test's stand-in for a slow disk, a lost node
or a node's stale copy."""

import builtins
import os
import sys
import time

_fault = os.environ.get("DSV3REF_TEST_FAULT", "").split(":")
_mine = len(_fault) > 1 and _fault[1] == os.environ.get("RANK")
_done: list = []


def _strike() -> None:
    if _done:
        return
    _done.append(True)
    if _fault[0] == "slow_load":
        time.sleep(float(_fault[2]))
    else:
        os._exit(0)


if _mine and _fault[0] in ("slow_load", "die_loading"):
    import safetensors

    _open = safetensors.safe_open

    class _Slice:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __getitem__(self, index):
            _strike()
            return self.inner[index]

    class _Handle:
        def __init__(self, *args, **kwargs):
            self.handle = _open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return _Slice(self.inner.get_slice(name))

        def get_tensor(self, name):
            _strike()
            return self.inner.get_tensor(name)

    safetensors.safe_open = _Handle

if _mine and _fault[0] == "other_copy" and "--ckpt-path" in sys.argv:
    sys.argv[sys.argv.index("--ckpt-path") + 1] = _fault[2]

if _mine and _fault[0] == "die_generating":
    _import = builtins.__import__

    def _patched_import(name, *args, **kwargs):
        module = _import(name, *args, **kwargs)
        sampling = sys.modules.get("dsv3ref.sampling")
        if hasattr(sampling, "Sampler") and not getattr(sampling.Sampler, "_faulted", False):
            sampling.Sampler._faulted = True
            sampling.Sampler.__call__ = lambda self, logits: os._exit(0)
        return module

    builtins.__import__ = _patched_import
