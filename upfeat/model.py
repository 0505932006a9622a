"""Backbone + trained upsampler as one ``nn.Module``, and loading it by name or path.

``upfeat.load("vits14_focus_jbu")`` loads a checkpoint shipped inside the package
(``upfeat.create_model(any_backbone, "jbu")`` the backbone-agnostic one, :data:`SHIPPED_JBU`);
``upfeat.load(path)`` any checkpoint written by ``upfeat train`` (its ``model.safetensors``, its
run folder, or a training checkpoint ``checkpoints/last.safetensors``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import backbones
from .checkpoint import CheckpointError, in_folder, load_checkpoint, load_module_state, subdict
from .io import ImageLike, to_tensor
from .upsamplers import Upsampler, create_upsampler

_WEIGHTS = Path(__file__).parent / "weights"
# name -> file in upfeat/weights (safetensors + a JSON sidecar with the same stem)
PRETRAINED = {"jbu": "jbu.safetensors", "vits14_focus_jbu": "vits14_focus_jbu.safetensors"}
# What "jbu" means everywhere (create_model, CLI, eval, demo): one backbone-agnostic checkpoint
# whose kernels depend on the image only, so it serves every backbone, dim and stride.
SHIPPED_JBU = "jbu"


def list_pretrained() -> list[str]:
    """Names accepted by :func:`load` besides paths."""
    return sorted(PRETRAINED)


class UpFeat(nn.Module):
    """Frozen backbone + upsampler: images ``(B, 3, H, W)`` in [0, 1] -> ``(B, dim, H, W)``.

    Calling it also accepts PIL images and numpy arrays; :meth:`upsample` adds inference mode
    and tiling for images too large for one pass.

    Attributes: ``backbone`` (:class:`upfeat.backbones.Backbone`), ``upsampler``
    (:class:`upfeat.upsamplers.Upsampler`), ``config`` (the checkpoint's JSON, or ``{}``).
    """

    def __init__(self, backbone: nn.Module, upsampler: Upsampler, config: dict | None = None) -> None:
        super().__init__()
        if (backbone.dim, backbone.stride) != (upsampler.dim, upsampler.stride):
            raise ValueError(f"upsampler built for dim {upsampler.dim}, stride {upsampler.stride} "
                             f"does not fit backbone dim {backbone.dim}, stride {backbone.stride}")
        self.backbone, self.upsampler, self.config = backbone, upsampler, dict(config or {})
        self.backbone.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.backbone.dim

    @property
    def stride(self) -> int:
        return self.backbone.stride

    def as_input(self, img: torch.Tensor | ImageLike) -> torch.Tensor:
        """Float ``(B, C, H, W)`` tensors unchanged; anything else :func:`upfeat.io.to_tensor`
        accepts (PIL image, numpy array, ``(3, H, W)`` or uint8 tensor, a list of them) ->
        ``(B, 3, H, W)`` on the model's device and float dtype."""
        if isinstance(img, torch.Tensor) and img.ndim == 4 and img.is_floating_point():
            return img
        x = to_tensor(img)
        ref = next((t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()),
                   None)
        return x if ref is None else x.to(ref.device, ref.dtype)

    def lowres(self, img: torch.Tensor | ImageLike) -> torch.Tensor:
        """Backbone features ``(B, dim, ceil(H/s), ceil(W/s))``."""
        return self.backbone(self.as_input(img))

    def forward(self, img: torch.Tensor | ImageLike,
                output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, dim, H', W')``, ``(H', W') = output_size or
        (H, W)``.

        ``img`` may also be a PIL image, a numpy array ``(H, W[, 1|3|4])``, a ``(3, H, W)`` or
        uint8 tensor, or a list of them (see :func:`upfeat.io.to_tensor`); float ``(B, C, H, W)``
        tensors are used as given (on their device, in the autograd graph).
        """
        img = self.as_input(img)
        low = self.lowres(img)  # in the backbone's dtype, whatever float dtype img has
        return self.upsampler(low, img.to(low.dtype), output_size)

    @torch.inference_mode()
    def upsample(self, img: torch.Tensor | ImageLike, max_memory: int | str = "4GB",
                 tile: int | None = None) -> torch.Tensor:
        """Inference on any image size: ``(B, dim, H, W)`` float32, tiled when one pass would need
        more than ``max_memory`` (bytes or ``'4GB'``; see :mod:`upfeat.memory`) or when ``tile``
        (upsampler tile side in pixels, a multiple of the stride) is given. The backbone still
        runs in one pass when that fits; see :mod:`upfeat.tiling`.

        Example:
            >>> up = create_model("vits14_focus", "bilinear")             # doctest: +SKIP
            >>> up.upsample(Image.open("photo.jpg"), max_memory="1GB").shape  # doctest: +SKIP
            torch.Size([1, 384, 480, 640])
        """
        from .memory import parse_bytes, plan_memory
        from .tiling import upsample_tiled
        x = self.as_input(img)
        budget = parse_bytes(max_memory, "max_memory")
        mem = plan_memory(self, tuple(x.shape[-2:]), budget, tile=tile)
        return upsample_tiled(self, x, mem.plan, mem.backbone_plan)[0] if mem.is_tiled else self(x)


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """Path of a shipped name, a checkpoint file, or a run folder (its ``model.safetensors``)."""
    if isinstance(name_or_path, str) and name_or_path in PRETRAINED:
        return _WEIGHTS / PRETRAINED[name_or_path]
    if not str(name_or_path).strip():  # Path("") is the current directory: never load from it
        raise CheckpointError(f"empty checkpoint name; shipped names: {', '.join(list_pretrained())}")
    p = Path(name_or_path)
    if p.is_dir():
        return in_folder(p)
    if not p.is_file():
        hint = f"; shipped names: {', '.join(list_pretrained())}" if not p.suffix else ""
        raise CheckpointError(f"no checkpoint {str(name_or_path)!r}: not a file or folder{hint}")
    return p


def for_backbone(up: Upsampler, meta: dict, backbone: nn.Module, source: object) -> Upsampler:
    """``up`` (loaded with ``meta``) made ready for ``backbone``: a backbone-agnostic upsampler is
    re-shaped to its dim and stride, any other one must match them (:func:`check_backbone`)."""
    if getattr(up, "agnostic", False):  # kernels from the image only: any dim and stride
        return up.for_backbone(backbone.dim, backbone.stride).eval()
    check_backbone(meta, backbone, source)
    return up


def check_backbone(meta: dict, backbone: nn.Module, source: object) -> None:
    """Raise :class:`CheckpointError` unless ``backbone`` has the checkpoint's dim and stride."""
    want = meta["backbone"]
    got = getattr(getattr(backbone, "cfg", None), "name", type(backbone).__name__)
    if (backbone.dim, backbone.stride) != (want["dim"], want["stride"]):
        raise CheckpointError(
            f"{source} was trained for backbone {want['name']!r} (dim {want['dim']}, stride "
            f"{want['stride']}), but backbone {got!r} has dim {backbone.dim}, stride "
            f"{backbone.stride}; train an upsampler for it: upfeat train --backbone {got} ...")
    if got != want["name"]:
        warnings.warn(f"{source} was trained on {want['name']!r} features, used with {got!r} "
                      f"(same dim and stride)", stacklevel=3)


def load_upsampler(name_or_path: str | os.PathLike[str]) -> tuple[Upsampler, dict]:
    """The trained upsampler of a checkpoint and the checkpoint's JSON config."""
    path = resolve(name_or_path)
    if name_or_path in PRETRAINED and not path.is_file():
        raise CheckpointError(f"the shipped checkpoint {name_or_path!r} is not in this install "
                              f"({path} is missing); train one with `upfeat train` and load its "
                              f"run folder or model.safetensors instead")
    tensors, meta = load_checkpoint(path)
    if "upsampler" not in meta or "backbone" not in meta:
        raise CheckpointError(f"{path}: not an upfeat model checkpoint (no upsampler/backbone "
                              f"in its config)")
    try:
        with torch.random.fork_rng(devices=[]):  # loading never moves the caller's RNG
            up = create_upsampler(**meta["upsampler"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build its upsampler {meta['upsampler']}: {e}") from None
    load_module_state(up, subdict(tensors, "upsampler"), "upsampler", path)
    return up.eval(), meta


def shipped_jbu(backbone: nn.Module) -> Upsampler:
    """The shipped JBU (:data:`SHIPPED_JBU`) for ``backbone``'s dim and stride, in eval mode.

    Raises :class:`CheckpointError` when it is not in this install.
    """
    name = jbu_name(getattr(getattr(backbone, "cfg", None), "name", None))
    up, meta = load_upsampler(name)
    return for_backbone(up, meta, backbone, name)


def has_shipped_jbu() -> bool:
    """Whether the shipped backbone-agnostic JBU's weights are in this install."""
    return (_WEIGHTS / PRETRAINED[SHIPPED_JBU]).is_file()


def jbu_name(backbone_name: str | None) -> str:
    """What ``"jbu"`` loads: the backbone-agnostic :data:`SHIPPED_JBU` when installed, else the
    per-backbone ``<backbone>_jbu`` (not trained for every backbone yet: issue 13)."""
    return SHIPPED_JBU if has_shipped_jbu() else f"{backbone_name}_jbu"


def load_downsampler(name_or_path: str | os.PathLike[str]) -> nn.Module:
    """The downsampler trained with a checkpoint's upsampler (for reconstruction checks)."""
    from .downsamplers import create_downsampler
    path = resolve(name_or_path)
    tensors, meta = load_checkpoint(path)
    if "downsampler" not in meta:
        raise CheckpointError(f"{path} has no downsampler (trained with the "
                              f"{meta.get('train', {}).get('objective', '?')!r} objective)")
    cfg, bb = dict(meta["downsampler"]), meta["backbone"]
    down = create_downsampler(cfg.pop("name"), dim=bb["dim"], stride=bb["stride"], **cfg)
    # several backbones: one downsampler each ("downsampler.<i>."); this is the first one's
    prefix = "downsampler.0" if len(meta.get("backbones", [])) > 1 else "downsampler"
    load_module_state(down, subdict(tensors, prefix), "downsampler", path)
    return down.eval()


def load(name_or_path: str | os.PathLike[str], backbone: str | nn.Module | None = None,
         device: str | torch.device | None = None) -> UpFeat:
    """Backbone + trained upsampler, in eval mode.

    Args:
        name_or_path: a shipped name (:func:`list_pretrained`) or a checkpoint path / run folder.
        backbone: ``None`` (the checkpoint's, created by name with its saved keywords), a
            registered name, or a :class:`~upfeat.backbones.Backbone`; must have the
            checkpoint's dim and stride (else :class:`CheckpointError`).
        device: where to put the model.

    Example:
        >>> up = load("vits14_focus_jbu")                         # doctest: +SKIP
        >>> up(torch.rand(1, 3, 224, 320)).shape                  # doctest: +SKIP
        torch.Size([1, 384, 224, 320])
    """
    up, meta = load_upsampler(name_or_path)
    if backbone is None:
        backbone = backbones.create(meta["backbone"]["name"], **meta["backbone"].get("kwargs", {}))
    elif isinstance(backbone, str):
        backbone = backbones.create(backbone)
    up = for_backbone(up, meta, backbone, resolve(name_or_path))
    model = UpFeat(backbone, up, meta).eval()
    return model.to(device) if device is not None else model


def create_model(backbone: str | nn.Module = "vits14_focus", upsampler: str = "jbu",
                 device: str | torch.device | None = None) -> UpFeat:
    """Backbone + upsampler from names, the way the CLI and demos pick them.

    Args:
        backbone: registered name / ``timm:<name>`` / a :class:`~upfeat.backbones.Backbone`.
        upsampler: a parameter-free upsampler (``nearest``, ``bilinear``, ``bicubic``,
            ``upsample_anything``: :data:`upfeat.upsamplers.PARAMETER_FREE`); ``jbu`` (the
            shipped backbone-agnostic JBU, :data:`SHIPPED_JBU`, for any backbone); a shipped
            name (e.g. the older ``vits14_focus_jbu``); or a checkpoint path / run folder.
    """
    from .upsamplers import PARAMETER_FREE, list_upsamplers
    if isinstance(backbone, str):
        bb_name, bb = backbone, None
    else:
        bb_name, bb = getattr(getattr(backbone, "cfg", None), "name", None), backbone
    if upsampler in PARAMETER_FREE:
        bb = backbones.create(bb_name) if bb is None else bb
        model = UpFeat(bb, create_upsampler(upsampler, dim=bb.dim, stride=bb.stride)).eval()
    elif upsampler in list_upsamplers():
        raise CheckpointError(f"upsampler {upsampler!r} has learned weights: pass a checkpoint "
                              f"(path or shipped name: {', '.join(list_pretrained())}) or 'jbu', "
                              f"or train one with `upfeat train --upsampler {upsampler}`")
    else:
        if upsampler == "jbu":
            upsampler = jbu_name(bb_name)
            if upsampler not in PRETRAINED:
                raise CheckpointError(f"no shipped JBU checkpoint for backbone {bb_name!r} (shipped: "
                                      f"{', '.join(list_pretrained())}); train one with "
                                      f"`upfeat train --backbone {bb_name} --data DIR` and pass "
                                      f"its folder")
        model = load(upsampler, backbone=bb if bb is not None else bb_name)
    return model.to(device) if device is not None else model
