"""Backbone + trained upsampler as one ``nn.Module``, and loading it by name or path.

Upsampler names are resolved by :mod:`upfeat.upsamplers.pretrained` (``jbu``,
``jbu_stack:vits14_focus``, ...): ``upfeat.create_model(any_backbone, "jbu")`` gives the shipped
backbone-agnostic JBU, ``upfeat.load("jbu:vits14_focus")`` the one trained on ``vits14_focus``;
``upfeat.load(path)`` any checkpoint written by ``upfeat train`` (its ``model.safetensors``, its
run folder, or a training checkpoint ``checkpoints/last.safetensors``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from . import backbones, upsamplers
from .checkpoint import CheckpointError, in_folder, load_checkpoint, load_module_state, subdict
from .io import ImageLike, to_tensor
from .upsamplers import Upsampler
from .upsamplers.pretrained import (check_backbone, for_backbone, is_name, list_pretrained,
                                    load_upsampler, resolve_name, weights_file)

# What "jbu" means everywhere (create_model, CLI, eval, demo): one backbone-agnostic checkpoint
# whose kernels depend on the image only, so it serves every backbone, dim and stride.
SHIPPED_JBU = "jbu"


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
        more than ``max_memory`` (bytes or ``'4GB'``; see :mod:`upfeat.inference.planning`) or
        when ``tile`` (upsampler tile side in pixels, a multiple of the stride) is given. The
        backbone still runs in one pass when that fits; see :mod:`upfeat.inference.tiled`.

        Example:
            >>> up = create_model("vits14_focus", "bilinear")             # doctest: +SKIP
            >>> up.upsample(Image.open("photo.jpg"), max_memory="1GB").shape  # doctest: +SKIP
            torch.Size([1, 384, 480, 640])
        """
        from .inference.memory import parse_bytes
        from .inference.planning import plan_memory
        from .inference.tiled import upsample_tiled
        x = self.as_input(img)
        budget = parse_bytes(max_memory, "max_memory")
        mem = plan_memory(self, tuple(x.shape[-2:]), budget, tile=tile)
        return upsample_tiled(self, x, mem.plan, mem.backbone_plan)[0] if mem.is_tiled else self(x)


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """Path of shipped weights (a name, :func:`list_pretrained`), a checkpoint file, or a run
    folder's checkpoint (:func:`upfeat.checkpoint.in_folder`)."""
    if is_name(name_or_path):
        return weights_file(name_or_path)
    if not str(name_or_path).strip():  # Path("") is the current directory: never load from it
        raise CheckpointError(f"empty checkpoint name; shipped names: {', '.join(list_pretrained())}")
    p = Path(name_or_path)
    if p.is_dir():
        return in_folder(p)
    if not p.is_file():
        hint = f"; shipped names: {', '.join(list_pretrained())}" if not p.suffix else ""
        raise CheckpointError(f"no checkpoint {str(name_or_path)!r}: not a file or folder{hint}")
    return p


def has_shipped_jbu() -> bool:
    """Whether the shipped backbone-agnostic JBU's weights are in this install."""
    return resolve_name(SHIPPED_JBU).file.is_file()


def load_downsampler(name_or_path: str | os.PathLike[str]) -> nn.Module:
    """The downsampler trained with a checkpoint's upsampler (for reconstruction checks)."""
    from . import downsamplers
    path = resolve(name_or_path)
    tensors, meta = load_checkpoint(path)
    if "downsampler" not in meta:
        raise CheckpointError(f"{path} has no downsampler (trained with the "
                              f"{meta.get('train', {}).get('objective', '?')!r} objective)")
    cfg, bb = dict(meta["downsampler"]), meta["backbone"]
    down = downsamplers.create(cfg.pop("name"), dim=bb["dim"], stride=bb["stride"], **cfg)
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
    path = resolve(name_or_path)
    up, meta = load_upsampler(path)
    if backbone is None:
        backbone = backbones.create(meta["backbone"]["name"], **meta["backbone"].get("kwargs", {}))
    elif isinstance(backbone, str):
        backbone = backbones.create(backbone)
    up = for_backbone(up, meta, backbone, path)
    model = UpFeat(backbone, up, meta).eval()
    return model.to(device) if device is not None else model


def create_model(backbone: str | nn.Module = "vits14_focus", upsampler: str = "jbu",
                 device: str | torch.device | None = None) -> UpFeat:
    """Backbone + upsampler from names, the way the CLI and demos pick them.

    Args:
        backbone: registered name / ``timm:<name>`` / a :class:`~upfeat.backbones.Backbone`.
        upsampler: a name :func:`upfeat.upsamplers.resolve_name` accepts: a parameter-free
            upsampler (``nearest``, ``bilinear``, ``bicubic``, ``upsample_anything``), ``jbu`` /
            ``jbu_stack`` (the shipped backbone-agnostic JBU, for any backbone), shipped weights
            by tag (``jbu:vits14_focus``, or the older ``vits14_focus_jbu``); or a checkpoint
            path / run folder. A learned upsampler without shipped weights (``resize_conv``)
            raises one line saying to pass a checkpoint.
    """
    if isinstance(backbone, str):
        bb_name, bb = backbone, None
    else:
        bb_name, bb = getattr(getattr(backbone, "cfg", None), "name", None), backbone
    if not is_name(upsampler):  # a checkpoint file or run folder
        model = load(upsampler, backbone=bb if bb is not None else bb_name)
    elif (r := resolve_name(upsampler)).file is None:  # parameter-free: built by name
        bb = backbones.create(bb_name) if bb is None else bb
        model = UpFeat(bb, upsamplers.create(r.name, dim=bb.dim, stride=bb.stride)).eval()
    else:  # shipped weights (one-line error when not in this install)
        model = load(upsampler, backbone=bb if bb is not None else bb_name)
    return model.to(device) if device is not None else model
