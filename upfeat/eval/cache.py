"""Backbone-feature cache: low-res features computed once per (backbone, image content, size).

Evaluating six upsamplers on one split needs the same backbone features six times; the backbone
dominates the cost, the upsamplers do not. :class:`CachedBackbone` keys each image of a batch by a
hash of its pixels (so its size too) and of the backbone's weights, and keeps the features in a
:class:`FeatureCache`: an in-memory LRU bounded in bytes, optionally backed by a folder of
safetensors files (``<key>.safetensors``, one tensor ``"feats"``) that survives the process.
The disk cache is disposable: delete the folder to clear it; unreadable files are recomputed.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..backbones.base import check_image
from ..checkpoint import weights_fingerprint


class FeatureCache:
    """Key -> tensor store: LRU in memory up to ``memory_mb``, optionally mirrored in ``disk_dir``.

    Args:
        memory_mb: byte budget of the in-memory part (least recently used entries are evicted;
            0 disables it). A tensor larger than the budget is not kept in memory.
        disk_dir: folder for safetensors copies (created on first write), or ``None``.
    """

    def __init__(self, memory_mb: float = 2048, disk_dir: str | os.PathLike[str] | None = None) -> None:
        if not memory_mb >= 0:
            raise ValueError(f"memory_mb must be >= 0, got {memory_mb!r}")
        self.budget = int(memory_mb * 2 ** 20)
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = self.disk_hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, key: str) -> bool:
        path = self._path(key)
        return key in self._mem or (path is not None and path.is_file())

    def _path(self, key: str) -> Path | None:
        return self.disk_dir / f"{key}.safetensors" if self.disk_dir is not None else None

    def get(self, key: str) -> torch.Tensor | None:
        """The stored tensor (do not modify it in place) or ``None``."""
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key]
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                t = load_file(str(path))["feats"]
            except Exception as e:  # a torn or foreign file: recompute rather than fail
                warnings.warn(f"ignoring unreadable cache file {path}: {e}", stacklevel=2)
            else:
                self.disk_hits += 1
                self._remember(key, t)
                return t
        self.misses += 1
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store ``value`` (detached) in memory (LRU) and, if configured, on disk."""
        value = value.detach()
        path = self._path(key)
        if path is not None and not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({"feats": value.cpu().contiguous()}, str(tmp))
            os.replace(tmp, path)  # readers never see a partial file
        self._remember(key, value)

    def _remember(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.budget:
            return
        if key in self._mem:
            old = self._mem.pop(key)
            self.nbytes -= old.numel() * old.element_size()
        while self._mem and self.nbytes + size > self.budget:
            old = self._mem.popitem(last=False)[1]
            self.nbytes -= old.numel() * old.element_size()
        self._mem[key] = value
        self.nbytes += size

    def clear(self) -> None:
        """Forget the in-memory entries (the disk folder is left alone)."""
        self._mem.clear()
        self.nbytes = 0


def image_key(image: torch.Tensor) -> str:
    """Hash of one (3, H, W) image's shape, dtype and pixel values."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(image.shape)}{image.dtype}".encode())
    h.update(image.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CachedBackbone:
    """``backbone(image)`` with per-image caching: (B, 3, H, W) -> (B, dim, ceil(H/s), ceil(W/s)).

    Runs under ``torch.inference_mode``; only the images missing from the cache go through the
    backbone (as one batch). ``stride``, ``dim`` and ``name`` mirror the backbone's.
    """

    def __init__(self, backbone: nn.Module, cache: FeatureCache | None = None) -> None:
        self.backbone = backbone.eval()
        self.cache = cache if cache is not None else FeatureCache()
        self._fingerprint: str | None = None

    @property
    def stride(self) -> int:
        return self.backbone.stride

    @property
    def dim(self) -> int:
        return self.backbone.dim

    @property
    def name(self) -> str:
        return str(getattr(getattr(self.backbone, "cfg", None), "name", type(self.backbone).__name__))

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # hashing ~90 MB of weights takes ~0.2 s, once
            self._fingerprint = weights_fingerprint(self.backbone)
        return self._fingerprint

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        check_image(image, "image")
        keys = [f"{self.fingerprint}-{image_key(img)}" for img in image]
        found = [self.cache.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            with torch.inference_mode():
                new = self.backbone(image[todo])
            for i, f in zip(todo, new):
                # A clone outside inference mode: own storage (an entry never pins the whole
                # batch) and a normal tensor that later autograd code may use.
                f = f.clone()
                self.cache.put(keys[i], f)
                found[i] = f
        dev = image.device
        return torch.stack([f.to(dev) for f in found])  # type: ignore[union-attr]
