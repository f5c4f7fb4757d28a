"""Exact, repeatable CPU memory measurement: peak bytes of live tensor storage.

``with PeakMemory() as m: ...; m.peak`` counts every storage that an operator *creates* inside the
block (forward, autograd backward, factory functions) from the moment it is first seen until it
is freed, and records the maximum of the running total. Tensors that existed before the block
(parameters, inputs) are not counted, so ``peak`` is the extra memory a computation needs.

Why not the alternatives (docs/design.md §9): ``tracemalloc``/RSS miss torch's allocator or read the
parent's peak, and a ``saved_tensors_hooks`` byte sum counts everything ever saved rather than
what is alive at once, which makes an adjoint (many short-lived graphs) look larger than backprop.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory"]


class PeakMemory(TorchDispatchMode):
    """A ``TorchDispatchMode`` that tracks live tensor-storage bytes; ``peak`` and ``current`` in bytes.

    A storage is added when an op output using it is first seen and subtracted when the storage
    object is garbage-collected (weakref callback), so views and in-place results are counted once.
    Autograd's backward runs on the calling thread for CPU tensors, so it is measured too.
    Re-entering the same meter continues the count (``reset_peak()`` restarts the peak).
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        self.peak = self.current

    def _free(self, key: int, nbytes: int, _ref) -> None:
        if self._refs.pop(key, None) is not None:
            self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = id(st)
        ref = self._refs.get(key)
        if ref is not None and ref() is st:
            return
        nbytes = st.nbytes()
        # the weakref callback fires when the storage itself (not one view of it) is released
        self._refs[key] = weakref.ref(st, lambda r, k=key, n=nbytes: self._free(k, n, r))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
