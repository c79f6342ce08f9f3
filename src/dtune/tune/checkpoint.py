"""Checkpoints: a directory on disk, made from a dict or from the user's own directory.

A checkpoint reported with :func:`dtune.report` is copied into the trial's directory
atomically (written to a temporary sibling, then renamed), so a crash never leaves half a
checkpoint behind. Dicts holding torch tensors are saved with ``torch.save`` and loaded with
``weights_only=True``: loading a checkpoint never executes code.

Example:
    >>> ckpt = Checkpoint.from_dict({"step": 3})
    >>> ckpt.to_dict()["step"]
    3
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["Checkpoint"]

_TORCH_FILE = "data.pt"
_PICKLE_FILE = "data.pkl"


class Checkpoint:
    """A trial's saved state: either an in-memory dict not yet written, or a directory."""

    __slots__ = ("_data", "path")

    def __init__(self, path: str | os.PathLike[str] | None = None, *, _data: dict[str, Any] | None = None):
        if path is None and _data is None:
            raise ValueError(
                "A Checkpoint needs a directory path or a dict; use from_directory or from_dict."
            )
        self.path = None if path is None else str(path)
        self._data = _data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        """A checkpoint of ``data``; written to disk when it is reported."""
        if not isinstance(data, Mapping):
            raise TypeError(f"Checkpoint.from_dict needs a dict, got {type(data).__name__}.")
        return cls(_data=dict(data))

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """A checkpoint of everything in ``path``; copied into the trial's directory when reported."""
        if not Path(path).is_dir():
            raise FileNotFoundError(f"Checkpoint.from_directory: {str(path)!r} is not a directory.")
        return cls(path)

    def to_dict(self) -> dict[str, Any]:
        """The dict this checkpoint was made from (torch tensors load with ``weights_only=True``)."""
        if self._data is not None:
            return dict(self._data)
        assert self.path is not None
        torch_file = Path(self.path, _TORCH_FILE)
        if torch_file.exists():
            import torch

            loaded = torch.load(torch_file, weights_only=True, map_location="cpu")
            return dict(loaded)
        pickle_file = Path(self.path, _PICKLE_FILE)
        if pickle_file.exists():
            with open(pickle_file, "rb") as fh:
                return dict(pickle.load(fh))
        raise ValueError(
            f"Checkpoint at {self.path!r} was made from a directory, not a dict; "
            "read its files through `checkpoint.path` instead of to_dict()."
        )

    def as_directory(self) -> str:
        """A directory holding the checkpoint's files (a dict checkpoint is written to a temp dir)."""
        if self.path is not None:
            return self.path
        return self.write_to(tempfile.mkdtemp(prefix="dtune-ckpt-") + "/checkpoint").path or ""

    def write_to(self, target: str | os.PathLike[str]) -> Checkpoint:
        """Write atomically to ``target`` (replacing it) and return the on-disk checkpoint."""
        target = Path(target)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        if self._data is not None:
            tmp.mkdir(parents=True)
            if "torch" in sys.modules:
                import torch

                torch.save(self._data, tmp / _TORCH_FILE)
            else:
                with open(tmp / _PICKLE_FILE, "wb") as fh:
                    pickle.dump(self._data, fh, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            assert self.path is not None
            shutil.copytree(self.path, tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
        return Checkpoint(target)

    def __repr__(self) -> str:
        return (
            f"Checkpoint({self.path!r})"
            if self.path
            else f"Checkpoint(<dict of {len(self._data or {})} keys>)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.path, self._data))


def _rebuild(path: str | None, data: dict[str, Any] | None) -> Checkpoint:
    return Checkpoint(path, _data=data)
