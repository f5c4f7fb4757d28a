"""The output folder of a batch run: its configuration, one result file per item, the summary files.

Layout::

    out/config.json      the configuration and its SHA-256 (a rerun with another configuration is refused)
    out/items/<id>.pt    one result per finished item (torch.save of tensors and numbers)
    out/results.csv      one row per item (written by rank 0 at the end)
    out/summary.md

Every file is written to a temporary name next to its target and renamed over it
(:func:`~adjointflow.fingerprint.save_atomic`), so a reader -- or a rerun after a kill -- sees a finished
file or none. Temporary files a killed run left behind (``items/<id>.pt.*.tmp``) are removed when the
next run starts. An item is finished exactly when its result file exists.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..fingerprint import save_atomic

__all__ = ["ResultStore", "RESULT_FORMAT", "CONFIG_NAME"]

RESULT_FORMAT = "adjointflow.guide-result/1"
CONFIG_NAME = "config.json"
_RESULT_KEYS = {"format": str, "id": str, "config_sha256": str, "x": torch.Tensor, "loss": float, "nfe": int,
                "vjps": int, "seconds": float, "stop_reason": str, "seed": int}


class ResultStore:
    """Files of one output folder (see the module docstring)."""

    def __init__(self, out: str | os.PathLike):
        self.root = Path(out)
        self.items = self.root / "items"

    def result_path(self, item_id: str) -> Path:
        return self.items / f"{item_id}.pt"

    def prepare(self, config: dict[str, Any], config_sha256: str, force: bool) -> None:
        """Create the folder for ``config``; refuse (``FileExistsError``) a folder holding another
        configuration's results unless ``force``, which deletes them. Removes stale temporary files.
        Run by one process (rank 0) before any rank writes."""
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"output {self.root} exists and is not a folder")
        cfg_path = self.root / CONFIG_NAME
        if cfg_path.exists():
            old = self._read_config(cfg_path)
            if old != config_sha256:
                if not force:
                    raise FileExistsError(
                        f"output folder {self.root} holds results of a different configuration ({CONFIG_NAME}: "
                        f"sha256 {old[:12]}..., this run {config_sha256[:12]}...); choose another folder, or pass "
                        f"--force (force=True) to delete those results")
                self._clear()
        elif self.items.is_dir() and any(self.items.glob("*.pt")):
            if not force:
                raise FileExistsError(f"{self.items} holds results but {cfg_path} is missing: cannot tell which "
                                      f"configuration made them; choose another folder or pass --force to delete them")
            self._clear()
        self.items.mkdir(parents=True, exist_ok=True)
        for stale in self.items.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        for stale in self.root.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        text = json.dumps({"sha256": config_sha256, "config": config}, indent=1, sort_keys=True)
        self.write_text(CONFIG_NAME, text + "\n")

    @staticmethod
    def _read_config(path: Path) -> str:
        try:
            value = json.loads(path.read_text())["sha256"]
            if not isinstance(value, str):
                raise TypeError("sha256 is not a string")
            return value
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a batch-run configuration ({exc}); pass --force to start over") from None

    def _clear(self) -> None:
        if self.items.is_dir():
            shutil.rmtree(self.items)
        for name in (CONFIG_NAME, "results.csv", "summary.md"):
            (self.root / name).unlink(missing_ok=True)

    def finished(self) -> list[str]:
        """Ids of the items with a result file."""
        if not self.items.is_dir():
            return []
        return sorted(p.stem for p in self.items.glob("*.pt"))

    def save(self, item_id: str, result: dict[str, Any]) -> None:
        save_atomic({"format": RESULT_FORMAT, "id": item_id, **result}, self.result_path(item_id))

    def load(self, item_id: str) -> dict[str, Any]:
        """A result file, checked (``ValueError`` naming it if it is not one)."""
        path = self.result_path(item_id)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable result file ({type(exc).__name__}: {exc})") from None
        if not isinstance(blob, dict) or blob.get("format") != RESULT_FORMAT:
            raise ValueError(f"{path} is not a result file of this version")
        for k, kind in _RESULT_KEYS.items():
            if not isinstance(blob.get(k), kind):
                raise ValueError(f"{path}: {k!r} is missing or not a {kind.__name__}")
        return blob

    def write_text(self, name: str, text: str) -> None:
        """``root/name`` replaced atomically by ``text``."""
        save_atomic(text, self.root / name, writer=_write_utf8)


def _write_utf8(text: str, f: io.BufferedWriter) -> None:
    f.write(text.encode("utf-8"))
