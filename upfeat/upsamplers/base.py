"""The :class:`Upsampler` interface and the cell-aligned geometry every upsampler shares.

Size policy (matches :class:`upfeat.backbones.Backbone`): a stride-``s`` backbone pads the image
bottom/right to ``(h*s, w*s)`` with ``h = ceil(H/s)``, so feature cell ``(i, j)`` covers pixels
``[i*s, (i+1)*s) x [j*s, (j+1)*s)``. Upsamplers therefore work on that *padded* extent and crop
the top-left ``H x W`` at the end; resizing features straight to ``H x W`` would stretch the grid
and shift every feature by up to a cell when ``H`` is not a multiple of ``s``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import ShapeError, check_floating, check_same, check_shape
from .._checks import check_image


@dataclass(frozen=True)
class Geometry:
    """Sizes of one upsampling call.

    Attributes:
        feat: ``(h, w)`` low-res grid.  image: ``(H, W)`` of the guidance image.
        padded: ``(h*s, w*s)``, the pixels the feature grid covers.
        output: requested ``(H', W')``.
        grid: ``(Hq, Wq)`` = ``ceil(padded * output / image)``, the output-resolution grid over the
            padded extent; the output is its top-left part.
        exact: whether that part is a whole number of grid pixels (always true when
            ``output == image``), so cropping is slicing, not resampling.
    """

    feat: tuple[int, int]
    image: tuple[int, int]
    padded: tuple[int, int]
    output: tuple[int, int]
    grid: tuple[int, int]
    exact: bool

    def crop(self, x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """``(B, C, Hq, Wq)`` over the padded extent -> ``(B, C, H', W')`` over the image."""
        (Ho, Wo), (Hq, Wq) = self.output, self.grid
        if tuple(x.shape[-2:]) != (Hq, Wq):
            raise ShapeError(f"expected a ({Hq}, {Wq}) grid to crop, got {tuple(x.shape)}")
        if self.exact:
            return x[..., :Ho, :Wo]
        # The image covers the fraction image/padded of the grid's extent, starting top-left;
        # resample exactly those coordinates (align_corners=False: pixel centres).
        fy, fx = (i / p for i, p in zip(self.image, self.padded))
        theta = torch.tensor([[fx, 0.0, fx - 1.0], [0.0, fy, fy - 1.0]], dtype=x.dtype,
                             device=x.device).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], Ho, Wo], align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)

    def pad_image(self, image: torch.Tensor) -> torch.Tensor:
        """Pad ``(B, 3, H, W)`` bottom/right by edge replication to ``padded``, as the backbone does."""
        ph, pw = self.padded[0] - self.image[0], self.padded[1] - self.image[1]
        return F.pad(image, (0, pw, 0, ph), mode="replicate") if ph or pw else image


def resize_area(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, h, w) to ``size``: box average when shrinking (FeatUp's guidance), else bilinear."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    if size[0] <= image.shape[-2] and size[1] <= image.shape[-1]:
        return F.adaptive_avg_pool2d(image, size)
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def check_size(size: object, name: str = "output_size") -> tuple[int, int]:
    """Validate a ``(height, width)`` pair of positive ints."""
    ok = isinstance(size, (tuple, list, torch.Size)) and len(size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    if not ok:
        raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {size!r}")
    return int(size[0]), int(size[1])  # type: ignore[index]


class Upsampler(nn.Module):
    """Base class: ``forward(feats (B, dim, h, w), image (B, 3, H, W), output_size=None)``.

    ``h, w`` must equal ``ceil(H/stride), ceil(W/stride)`` (the backbone's grid for that image);
    the output is ``(B, dim, H', W')`` with ``(H', W') = output_size or (H, W)``.
    Subclasses call :meth:`geometry` first and pass their constructor keywords to ``__init__`` so
    :meth:`config` can rebuild them.
    """

    name: str = ""  # set by @register_upsampler

    def __init__(self, dim: int, stride: int, **cfg: object) -> None:
        super().__init__()
        for key, v in (("dim", dim), ("stride", stride)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key} must be a positive int, got {v!r}")
        self.dim, self.stride = dim, stride
        self._cfg = dict(cfg)

    def config(self) -> dict:
        """JSON-serialisable constructor arguments: ``upfeat.upsamplers.create(**config())``
        rebuilds it."""
        return {"name": self.name, "dim": self.dim, "stride": self.stride, **self._cfg}

    def geometry(self, feats: torch.Tensor, image: torch.Tensor,
                 output_size: tuple[int, int] | None = None) -> Geometry:
        """Validate the inputs of ``forward`` and work out the sizes (see :class:`Geometry`)."""
        f = check_shape(feats, ["B", "C", "h", "w"], "feats")
        check_floating(feats, "feats")
        if f["C"] != self.dim:
            raise ShapeError(f"feats has {f['C']} channels (shape {tuple(feats.shape)}) but this "
                             f"{type(self).__name__} was built for dim={self.dim}")
        g = check_image(image, "image")
        check_same({"feats": feats, "image": image}, "device")
        if g["B"] != f["B"]:
            raise ShapeError(f"batch mismatch: feats {tuple(feats.shape)}, image {tuple(image.shape)}")
        H, W, s = g["H"], g["W"], self.stride
        expected = (-(-H // s), -(-W // s))
        if (f["h"], f["w"]) != expected:
            raise ShapeError(
                f"feats grid {f['h']}x{f['w']} does not fit image {H}x{W} at stride {s}: expected "
                f"ceil(H/{s}) x ceil(W/{s}) = {expected[0]}x{expected[1]}. Pass the image the "
                f"backbone saw (use output_size for another output resolution), or fix stride.")
        Ho, Wo = (H, W) if output_size is None else check_size(output_size)
        Hp, Wp = expected[0] * s, expected[1] * s
        Hq, Wq = -(-Hp * Ho // H), -(-Wp * Wo // W)
        exact = Hq * H == Hp * Ho and Wq * W == Wp * Wo
        return Geometry((f["h"], f["w"]), (H, W), (Hp, Wp), (Ho, Wo), (Hq, Wq), exact)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
