"""Identity of a model and integrity of saved files: what ties a trained bespoke solver (or a cached
ground truth) to the exact model it was computed for, and what proves a file was not altered.

* :func:`model_fingerprint` hashes, by value, everything that determines a denoiser's drift that it
  can see. Where it cannot see the whole network it refuses to name it (``ValueError``) unless the
  caller vouches for the model's identity with ``model_id``: a silent fingerprint collision would let
  a solver trained for one model load for another.
* :func:`digest` is a SHA-256 over metadata and tensors (names, dtypes, shapes and bytes), stored in
  a file and recomputed when it is read back.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import os
import tempfile
import types
from typing import Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["model_fingerprint", "digest", "value_digest", "FingerprintGap", "save_atomic", "describe_error"]

_MAX_DEPTH = 24


class FingerprintGap(ValueError):
    """The fingerprint cannot cover part of a network (the message says which part)."""


class _Hasher:
    """Feeds values into one SHA-256 and records what it could not hash by value (``gaps``).

    Covered by value: tensors and numpy arrays (bytes), numbers, strings, dtypes, devices, enums,
    containers, dataclasses, ``functools.partial`` (function, args, keywords), bound methods (function
    and instance), Python functions (byte code, constants, nested code, defaults, closure contents and
    every global they read), ``nn.Module`` s (class name, parameters, buffers, the plain attributes of
    every submodule, forward hooks) and other objects through their ``__dict__`` / ``__slots__``.
    Classes, Python modules and built-in functions are identified by their qualified names: their
    code is not hashed (so the fingerprint of a module survives a torch or Python upgrade). A value
    of none of these kinds (state held in a C extension, e.g. a ``torch.Generator``), a reference
    nested deeper than 24 levels, are gaps.
    """

    def __init__(self):
        self.h = hashlib.sha256()
        self.gaps: list[str] = []
        self._seen: dict[int, int] = {}
        self._alive: list = []  # keeps the objects whose ids are memoised alive

    def put(self, *parts) -> None:
        for p in parts:
            self.h.update(p if isinstance(p, bytes) else str(p).encode())
            self.h.update(b"\x00")

    def feed(self, v, where: str, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            self.gaps.append(f"{where} (references nested deeper than {_MAX_DEPTH} levels)")
            return
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            self.put("T", t.dtype, tuple(t.shape))
            self.put(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            return
        if isinstance(v, np.ndarray):
            if v.dtype == object:
                self.put("NO", v.shape)
                for k, e in enumerate(v.reshape(-1)):
                    self.feed(e, f"{where}[{k}]", depth + 1)
                return
            self.put("N", v.dtype.str, v.shape, np.ascontiguousarray(v).tobytes())
            return
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes, np.generic, torch.dtype,
                                       torch.device, enum.Enum, range, slice, type(Ellipsis))):
            self.put(type(v).__qualname__, repr(v))
            return
        if isinstance(v, (type, types.ModuleType, types.BuiltinFunctionType, np.ufunc)) or type(v).__name__ in (
                "method_descriptor", "wrapper_descriptor"):
            self.put("Q", getattr(v, "__module__", None), getattr(v, "__qualname__", getattr(v, "__name__", repr(v))))
            owner = getattr(v, "__self__", None)  # a built-in method bound to an object (tensor.mul)
            if owner is not None and not isinstance(owner, (type, types.ModuleType)):
                self.feed(owner, f"{where}.__self__", depth + 1)
            return
        # objects that can hold references: hash each once (cycles, shared submodules)
        key = id(v)
        if key in self._seen:
            self.put("REF", self._seen[key])
            return
        self._seen[key] = len(self._seen)
        self._alive.append(v)
        if isinstance(v, nn.Module):
            self._module(v, where, depth)
        elif dataclasses.is_dataclass(v):
            self.put("DC", type(v).__module__, type(v).__qualname__)
            for f in dataclasses.fields(v):
                self.put(f.name)
                self.feed(getattr(v, f.name), f"{where}.{f.name}", depth + 1)
        elif isinstance(v, (list, tuple)):
            self.put(type(v).__qualname__, len(v))
            for k, e in enumerate(v):
                self.feed(e, f"{where}[{k}]", depth + 1)
        elif isinstance(v, (set, frozenset)):
            self.put(type(v).__qualname__, len(v))
            for e in sorted(v, key=repr):
                self.feed(e, f"{where}{{}}", depth + 1)
        elif isinstance(v, Mapping):
            self.put("MAP", len(v))
            for k in sorted(v, key=repr):
                self.put(repr(k))
                self.feed(v[k], f"{where}[{k!r}]", depth + 1)
        elif isinstance(v, functools.partial):
            self.put("PARTIAL")
            self.feed(v.func, f"{where}.func", depth + 1)
            self.feed(v.args, f"{where}.args", depth + 1)
            self.feed(v.keywords, f"{where}.keywords", depth + 1)
        elif isinstance(v, types.MethodType):
            self.put("METHOD")
            self.feed(v.__func__, where, depth + 1)
            self.feed(v.__self__, f"{where}.__self__", depth + 1)
        elif isinstance(v, types.FunctionType):
            self._function(v, where, depth)
        else:
            self._object(v, where, depth)

    def _code(self, code: types.CodeType, names: set) -> None:
        self.put("CODE", code.co_code, code.co_names, code.co_varnames, code.co_freevars)
        names.update(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                self._code(c, names)  # repr(code) holds a memory address: hash nested code itself
            else:
                self.put(type(c).__qualname__, repr(c))

    def _function(self, fn: types.FunctionType, where: str, depth: int) -> None:
        names: set = set()
        self.put("FN", fn.__qualname__)
        self._code(fn.__code__, names)
        self.feed(fn.__defaults__, f"{where} defaults", depth + 1)
        self.feed(fn.__kwdefaults__, f"{where} keyword defaults", depth + 1)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            self.put(name)
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                self.put("EMPTY")
                continue
            self.feed(value, f"{where} (closure variable {name!r})", depth + 1)
        # the globals it reads (co_names also holds attribute names: those are absent or harmless)
        g = fn.__globals__
        for name in sorted(n for n in names if n in g):
            self.put("G", name)
            self.feed(g[name], f"{where} (global {name!r})", depth + 1)

    def _module(self, module: nn.Module, where: str, depth: int) -> None:
        # plain attributes of submodules matter too (a guidance scale, the schedule of an exact denoiser)
        self.put("MOD", type(module).__module__, type(module).__qualname__)
        for mname, m in sorted(module.named_modules(), key=lambda kv: kv[0]):
            self.put("M", mname, type(m).__module__, type(m).__qualname__)
            sub = f"{where}.{mname}" if mname else where
            # parameters and every buffer (non-persistent ones too: they are not in state_dict())
            for kind in ("_parameters", "_buffers"):
                for k, v in sorted(getattr(m, kind).items()):
                    self.put(kind, k)
                    self.feed(v, f"{sub}.{k}", depth + 1)
            for k, v in sorted(vars(m).items()):
                if k.startswith("_") or k == "training" or isinstance(v, nn.Module):
                    continue
                self.put(k)
                self.feed(v, f"{sub}.{k}", depth + 1)
            for kind in ("_forward_pre_hooks", "_forward_hooks"):
                hooks = getattr(m, kind, None) or {}
                for k, hook in enumerate(hooks.values()):
                    self.put(kind, k)
                    self.feed(hook, f"{sub} {kind[1:]}", depth + 1)

    def _object(self, v, where: str, depth: int) -> None:
        cls = type(v)
        slots = [s for c in cls.__mro__ for s in getattr(c, "__slots__", ()) if isinstance(s, str)]
        state = getattr(v, "__dict__", None)
        if state is None and not slots:
            self.gaps.append(f"{where} (a {cls.__module__}.{cls.__qualname__}, whose state is not visible to Python)")
            return
        self.put("OBJ", cls.__module__, cls.__qualname__)
        for k in sorted(set(slots) - {"__dict__", "__weakref__"}):
            if hasattr(v, k):
                self.put(k)
                self.feed(getattr(v, k), f"{where}.{k}", depth + 1)
        for k, e in sorted((state or {}).items()):
            self.put(k)
            self.feed(e, f"{where}.{k}", depth + 1)


def model_fingerprint(denoiser, model_id: str | None = None) -> str:
    """A short SHA-256 of what determines a denoiser's drift: the network (see below), the schedule
    (every field, tensors by value: two ``VPDiscrete`` tables differ), the prediction type, the time
    convention and ``net_time``.

    The network is hashed by value: an ``nn.Module`` by class, parameters, buffers, plain attributes
    of every submodule (a classifier-free guidance scale, numpy arrays) and forward hooks; a
    ``functools.partial`` by its function, arguments and keywords; a function by its code, defaults,
    closure contents and the globals it reads; a callable object by its attributes. Code of classes
    (an ``nn.Module``'s ``forward``) is identified by the class's qualified name.

    Where part of the network cannot be hashed by value (state inside a C extension object, such as
    a ``torch.Generator``) this raises :class:`FingerprintGap` (a ``ValueError``) naming that part,
    unless ``model_id`` -- a name the caller guarantees is unique to this exact model -- is given;
    ``model_id`` is then part of the fingerprint (and must be given again to load).
    """
    from .models import Denoiser

    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be an adjointflow.Denoiser, got {type(denoiser).__name__}")
    if model_id is not None and (not isinstance(model_id, str) or not model_id.strip()):
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    h = _Hasher()
    h.feed(denoiser.net, "net")
    for name in ("schedule", "prediction", "noise_at_zero", "net_time"):
        h.put(name)
        h.feed(getattr(denoiser, name), name)
    if h.gaps and model_id is None:
        more = f" (and {len(h.gaps) - 1} more)" if len(h.gaps) > 1 else ""
        raise FingerprintGap(
            f"cannot fingerprint this denoiser by value: {h.gaps[0]}{more}; a bespoke solver must be tied to the "
            f"exact model it was trained for, so pass model_id='<a name unique to this model>' (to fit, save "
            f"and load alike)"
        )
    if model_id is not None:
        h.put("MODEL_ID", model_id)
    return h.h.hexdigest()[:16]


def digest(meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of JSON metadata (keys sorted) and named tensors (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=repr).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\x00{name}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def describe_error(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` (a one-line reason for a load error)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def save_atomic(obj, path, writer=torch.save) -> None:
    """``writer(obj, file)`` (default ``torch.save``) to a temporary file next to ``path``, then rename it
    over ``path`` (atomic on POSIX: a reader sees the old file or the new one, never a partial write)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(obj, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a saved file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def value_digest(value, what: str = "value") -> str:
    """SHA-256 (hex) of ``value`` hashed by value as :func:`model_fingerprint` hashes a network (dataclasses,
    tensors, functions with their code and globals, objects' attributes); :class:`FingerprintGap` naming
    ``what`` and the part it cannot see."""
    h = _Hasher()
    h.feed(value, what)
    if h.gaps:
        raise FingerprintGap(f"cannot hash {what} by value: {h.gaps[0]}")
    return h.h.hexdigest()
