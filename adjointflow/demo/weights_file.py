"""Model weights and their metadata as one file: written atomically, checked before and after reading.

The file is a safetensors file (8-byte little-endian header length, JSON header, raw tensor bytes)
whose header metadata holds our JSON under ``"adjointflow"``, including ``"tensors_sha256"``: a
SHA-256 over every tensor's name, dtype, shape and bytes, in name order.

* :func:`save_weights` writes a temporary file next to the target, flushes it to disk and renames it
  over the target (``os.replace``, atomic on POSIX and Windows). A reader sees the old file or the new
  one, never a mix, whatever stops the writer (an exception, Ctrl-C, SIGKILL, a power cut after the
  rename's directory entry is synced).
* :func:`read_header` checks the header against the file's size before anything is allocated: every
  tensor's byte range lies inside the file and matches its dtype and shape, so a crafted header cannot
  make the reader allocate more than the file holds.
* :func:`read_tensors` reads the tensors and verifies the digest (a flipped bit is a ``ValueError``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["TensorSpec", "Header", "save_weights", "read_header", "read_tensors", "tensors_digest"]

META_KEY = "adjointflow"
_MAX_HEADER = 16 << 20  # bytes; ours are ~10 KB, safetensors itself refuses > 100 MB
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the header declares it: safetensors dtype name (``"F32"``, ...) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    """The checked header of a weights file: its tensors (name -> spec) and our metadata dict."""

    path: Path
    tensors: dict[str, TensorSpec]
    meta: dict[str, Any]


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict[str, Any],
                 *, overwrite: bool = True) -> dict[str, Any]:
    """Write ``state`` and ``meta`` (JSON-serialisable) to ``path`` as one file, atomically.

    Returns the metadata as stored (``meta`` plus ``"tensors_sha256"``). With ``overwrite=False`` an
    existing ``path`` is a ``FileExistsError`` (checked again just before the rename).
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {**meta, "tensors_sha256": tensors_digest(state)}
    text = json.dumps(meta, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", META_KEY: text})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are shared files
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} exists")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return meta


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable; not possible on every platform (Windows), harmless to skip there
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(path: str | os.PathLike) -> Header:
    """Parse and check the header of ``path`` (no tensor data is read). ``ValueError`` naming the file
    if it is not a well-formed weights file whose tensors fit exactly in it."""
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a valid weights file: {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise bad(f"the header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data_size = size - 8 - n
    meta_raw = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorSpec] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (a, b) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (dtype in _ITEMSIZE and all(isinstance(s, int) and s >= 0 for s in shape)
                  and isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= data_size)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {name!r} has a malformed entry or lies outside the file: {entry!r}")
        if math.prod(shape) * _ITEMSIZE[dtype] != b - a:
            raise bad(f"tensor {name!r} declares {dtype}{list(shape)} but spans {b - a} bytes")
        tensors[name] = TensorSpec(dtype, shape)
        spans.append((a, b))
    spans.sort()
    if any(b0 > a1 for (_, b0), (a1, _) in zip(spans, spans[1:])):
        raise bad("tensor byte ranges overlap")
    if not isinstance(meta_raw, dict) or META_KEY not in meta_raw:
        raise bad(f"no {META_KEY!r} metadata (not written by adjointflow's save_weights)")
    try:
        meta = json.loads(meta_raw[META_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise bad(f"the {META_KEY!r} metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors_sha256"), str):
        raise bad(f"the {META_KEY!r} metadata is not an object with a tensors_sha256 digest")
    return Header(path, tensors, meta)


def read_tensors(header: Header) -> dict[str, torch.Tensor]:
    """Read the tensors of a checked header and verify their digest (``ValueError`` naming the file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(header.path))
    except SafetensorError as exc:
        raise ValueError(f"{header.path} is not a valid weights file: {exc}") from None
    if set(state) != set(header.tensors):  # the file changed since read_header
        raise ValueError(f"{header.path} changed while it was being read")
    digest = tensors_digest(state)
    if digest != header.meta["tensors_sha256"]:
        raise ValueError(f"sha256 of the tensors in {header.path} is {digest}, but its metadata records "
                         f"{header.meta['tensors_sha256']}: the file is corrupt")
    return state
