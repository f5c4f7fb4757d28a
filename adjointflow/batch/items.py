"""Inputs of a batch run: items listed from a ``.npz`` file or a folder, each with a stable identity.

* ``.npz``: arrays ``y`` (measurements, ``(N, *measurement)``) and/or ``x`` (ground-truth images,
  ``(N, *sample)``), optionally ``ids`` (``N`` strings). Item ``i`` is named ``ids[i]`` or ``"%06d" % i``.
  Given only ``x``, the measurement is simulated (see :mod:`adjointflow.batch.runner`); given both, ``x``
  is the ground truth for PSNR.
* A folder: one file per item, ``*.npy`` (an array) or ``*.png`` (8-bit grey or RGB, mapped to
  ``[-1, 1]``, shape ``(C, H, W)``), named by the file's stem; ``given`` says whether they are
  ``"measurements"`` or ``"images"`` (ground truth, measurement simulated).

Listing reads no array data. :meth:`ItemSource.shape` reads one item's header (``.npy`` header, PNG size);
:meth:`ItemSource.load` its data. A missing or unreadable file raises ``OSError``/``ValueError``
naming it, which the runner turns into a per-item error line.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["ItemData", "ItemSource", "open_inputs", "GIVEN"]

GIVEN = ("measurements", "images")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SUFFIXES = (".npy", ".png")


@dataclass(frozen=True)
class ItemData:
    """One item: its measurement ``y`` (or ``None`` when it must be simulated from ``truth``) and its
    ground truth ``truth`` (or ``None``), both without a batch dimension."""

    y: Tensor | None
    truth: Tensor | None


def _check_id(item_id: str, where: str) -> str:
    if not _SAFE_ID.match(item_id):
        raise ValueError(f"{where}: item name {item_id!r} is not usable as a file name "
                         f"(letters, digits, '.', '_', '-'; at most 128 characters; not starting with '.' or '-')")
    return item_id


class ItemSource:
    """Items of one input (see the module docstring); ``ids`` sorted, unique."""

    path: Path
    ids: list[str]
    given: str

    def shape(self, item_id: str) -> tuple[int, ...]:
        raise NotImplementedError

    def load(self, item_id: str) -> ItemData:
        raise NotImplementedError


class NpzSource(ItemSource):
    def __init__(self, path: Path):
        self.path = path
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = set(z.files)
                if not keys & {"x", "y"}:
                    raise ValueError(f"{path} holds neither 'y' (measurements) nor 'x' (images): keys {sorted(keys)}")
                self._arrays = {k: np.asarray(z[k]) for k in ("x", "y") if k in keys}
                ids = [str(s) for s in z["ids"].tolist()] if "ids" in keys else None
        except (zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"{path} is not a readable .npz file ({exc})") from None
        lengths = {k: len(a) for k, a in self._arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{path}: arrays have different numbers of items: {lengths}")
        n = next(iter(lengths.values()))
        for k, a in self._arrays.items():
            if a.dtype.kind not in "fiu" or a.ndim < 2:
                raise ValueError(f"{path}: array {k!r} must be numeric with shape (N, ...), got {a.dtype} {a.shape}")
        if ids is None:
            ids = [f"{i:06d}" for i in range(n)]
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError(f"{path}: 'ids' must hold {n} distinct names, got {len(ids)} ({len(set(ids))} distinct)")
        self._index = {_check_id(s, str(path)): i for i, s in enumerate(ids)}
        self.ids = sorted(self._index)
        self.given = "measurements" if "y" in self._arrays else "images"

    def shape(self, item_id):
        return tuple(self._arrays["y" if "y" in self._arrays else "x"].shape[1:])

    def truth_shape(self):
        return tuple(self._arrays["x"].shape[1:]) if "x" in self._arrays else None

    def load(self, item_id):
        i = self._index[item_id]
        get = lambda k: torch.from_numpy(np.array(self._arrays[k][i], dtype=np.float64)) if k in self._arrays else None
        return ItemData(get("y"), get("x"))


class FolderSource(ItemSource):
    def __init__(self, path: Path, given: str):
        self.path, self.given = path, given
        self._files: dict[str, Path] = {}
        for f in sorted(path.iterdir()):
            if f.suffix.lower() in _SUFFIXES and not f.name.startswith("."):
                item_id = _check_id(f.stem, str(path))
                if item_id in self._files:
                    raise ValueError(f"{path}: two files for item {item_id!r}: {self._files[item_id].name}, {f.name}")
                self._files[item_id] = f
        if not self._files:
            raise ValueError(f"{path} holds no .npy or .png files")
        self.ids = sorted(self._files)

    def shape(self, item_id):
        f = self._files[item_id]
        if f.suffix.lower() == ".npy":
            return tuple(np.load(f, mmap_mode="r", allow_pickle=False).shape)
        from PIL import Image

        with Image.open(f) as im:
            channels = {"L": 1, "RGB": 3}.get(im.mode)
            if channels is None:
                raise ValueError(f"{f}: PNG mode {im.mode} (use 8-bit grey 'L' or 'RGB')")
            return (channels, im.height, im.width)

    def load(self, item_id):
        f = self._files[item_id]
        if f.suffix.lower() == ".npy":
            a = np.load(f, allow_pickle=False)
            if a.dtype.kind not in "fiu":
                raise ValueError(f"{f}: array of {a.dtype}, expected numbers")
            t = torch.from_numpy(np.array(a, dtype=np.float64))
        else:
            from PIL import Image

            with Image.open(f) as im:
                im.load()
                a = np.asarray(im, dtype=np.float64)
            t = torch.from_numpy(a).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1) / 127.5 - 1.0
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{f} contains NaN/Inf")
        return ItemData(t, None) if self.given == "measurements" else ItemData(None, t)


def open_inputs(path: str | os.PathLike, given: str = "measurements") -> ItemSource:
    """List the items of ``path`` (a ``.npz`` file or a folder); ``given`` applies to folders."""
    if given not in GIVEN:
        raise ValueError(f"given must be one of {GIVEN}, got {given!r}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"inputs {p} do not exist")
    if p.is_dir():
        return FolderSource(p, given)
    if p.suffix.lower() != ".npz":
        raise ValueError(f"inputs {p}: expected a .npz file or a folder of .npy/.png files")
    return NpzSource(p)
