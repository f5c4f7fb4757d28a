"""Activation recomputation for one solver step (what :class:`~adjointflow.adjoint.Checkpoint` runs).

The step runs with autograd recording its graph, but every tensor the graph would save for the
backward pass is replaced by its position (``torch.autograd.graph.saved_tensors_hooks``), so the
activations are freed as the forward pass goes. When the backward pass first asks for one of them, the
step is re-run from its stored input state with the same row and noise increment, the saved tensors
are collected in the same order, and handed out one by one (each released as it is used). This is the
mechanism of ``torch.utils.checkpoint`` (non-reentrant): the graph is the one recorded in the forward
pass, so gradients reach every tensor that affects the output (parameters, ``cond``, tensors captured
by closure) through ``.backward()`` and ``torch.autograd.grad`` alike, and equal :class:`Backprop`'s.
It keeps only what a solver step needs: no per-step frame bookkeeping for arbitrary functions, no
metadata checks, and the RNG state is restored for the recomputation only if the step drew random
numbers (compared before/after the step; a deterministic network pays nothing for the replay).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RecomputedStep"]


def _rng_state(device: torch.device):
    if device.type == "cuda":
        return torch.get_rng_state(), torch.cuda.get_rng_state(device)
    return torch.get_rng_state(), None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class RecomputedStep:
    """One step ``out = fn(*inputs)`` whose saved activations are recomputed on demand (module docstring).

    ``fn`` must be deterministic given ``inputs`` (and, if ``preserve_rng_state``, the RNG state it starts
    from); ``fn_replay`` is the same computation used for the recomputation (it may record nothing).
    ``live`` is a one-element list shared by the steps of a solve: the step whose recomputed tensors are
    held.
    """

    __slots__ = ("fn_replay", "inputs", "rng", "device", "saved", "live")

    def __init__(self, fn_replay, inputs: tuple[Tensor, ...], live: list):
        self.fn_replay, self.inputs, self.live = fn_replay, inputs, live
        self.rng = None
        self.device = inputs[0].device
        self.saved: list | None = None

    def run(self, fn, preserve_rng_state: bool):
        """Run ``fn()`` with the saved tensors packed into positions; returns its output."""
        before = _rng_state(self.device) if preserve_rng_state else None
        count = [0]

        def pack(t):
            count[0] += 1
            return count[0] - 1

        with torch.autograd.graph.saved_tensors_hooks(pack, self.unpack):
            out = fn()
        if before is not None:
            after = _rng_state(self.device)
            if not (torch.equal(before[0], after[0]) and (before[1] is None or torch.equal(before[1], after[1]))):
                self.rng = before  # the step drew random numbers: replay them
        return out

    def unpack(self, k: int) -> Tensor:
        saved = self.saved
        if saved is None or saved[k] is None:
            saved = self.saved = self._recompute()
        t, saved[k] = saved[k], None
        return t

    def _recompute(self) -> list:
        # the backward pass walks the steps from last to first: the previous recomputed step is done with,
        # so whatever of it autograd did not ask for is dropped (one step's activations alive at a time)
        if self.live and self.live[0] is not self:
            self.live[0].saved = None
        self.live[:] = [self]
        saved: list = []

        def pack(t):
            saved.append(t)
            return len(saved) - 1

        def unpack(k):  # pragma: no cover - the recomputed graph is never differentiated
            raise RuntimeError("the recomputed graph of a checkpointed step is not differentiable")

        current = _rng_state(self.device) if self.rng is not None else None
        try:
            if self.rng is not None:
                _set_rng_state(self.rng, self.device)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                self.fn_replay(*self.inputs)
        finally:
            if current is not None:
                _set_rng_state(current, self.device)
        return saved
