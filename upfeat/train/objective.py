"""The trainable part of multi-view training: upsampler + downsampler + loss (with its ScaleNet)."""
from __future__ import annotations

import torch
from torch import nn

from .. import downsamplers, upsamplers
from ..jitter import View, apply_view
from ..losses import MultiViewLoss
from ..losses.projection import project, random_projection
from .config import TrainConfig

BACKBONE_CHUNK = 16
"""Images per frozen-backbone call when computing a step's targets."""


@torch.no_grad()
def view_targets(backbone: nn.Module, image: torch.Tensor, views: list[View], bf16: bool = False
                 ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """The jittered images and the frozen backbone's features of one step.

    ``image`` (B, 3, H, W) -> ``(view_images, lr_feats, view_feats)``: ``t_i(x)`` (B, 3, H, W),
    ``f(x)`` (B, C, h, w) and ``f(t_i(x))`` (B, C, h, w), float32. The image and its views go
    through the backbone together (in chunks of :data:`BACKBONE_CHUNK`): one call of 10 images
    runs ~15 % faster on a CPU than five calls of 2. ``bf16``: under bfloat16 autocast (features
    differ ~0.5 % relative L2 from float32; ~1.7x faster where the hardware has bf16 products).
    """
    view_images = [apply_view(image, v) for v in views]
    x = torch.cat([image, *view_images])
    with torch.autocast(image.device.type, torch.bfloat16, enabled=bf16):
        feats = torch.cat([backbone(c).float() for c in x.split(BACKBONE_CHUNK)])
    lr_feats, *view_feats = feats.split(image.shape[0])
    return view_images, lr_feats, view_feats


class MultiViewObjective(nn.Module):
    """``forward`` = FeatUp's loss for one batch; this is the module DDP wraps.

    ``F_hr = σ↑(f(x), x)``; for each view ``t``: ``loss(f(t(x)), σ↓(t(F_hr)))`` (see
    :class:`upfeat.losses.MultiViewLoss`), averaged over views.

    Several backbones (a backbone-agnostic upsampler, e.g. ``jbu_stack`` with
    ``residual=False``): one shared upsampler, and per backbone its own downsampler and loss
    (``downsampler`` / ``criterion`` are then ``nn.ModuleList``s, indexed by ``which``).
    """

    def __init__(self, upsampler: nn.Module, downsampler: nn.Module, criterion: nn.Module,
                 shapes: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.upsampler, self.downsampler, self.criterion = upsampler, downsampler, criterion
        # per-backbone views of the shared upsampler (same layer modules: not registered twice)
        self._ups = [upsampler] + [upsampler.for_backbone(d, s, share=True)
                                   for d, s in (shapes or [])[1:]]

    @classmethod
    def from_config(cls, cfg: TrainConfig, dim: int | list[int],
                    stride: int | list[int]) -> MultiViewObjective:
        dims = dim if isinstance(dim, list) else [dim]
        strides = stride if isinstance(stride, list) else [stride]
        up = upsamplers.create(cfg.upsampler, dim=dims[0], stride=strides[0],
                               **cfg.upsampler_kwargs)
        if len(dims) > 1 and not getattr(up, "agnostic", False):
            raise ValueError(f"several backbones need a backbone-agnostic upsampler (e.g. jbu_stack "
                             f"with residual=false), not {cfg.upsampler!r} {cfg.upsampler_kwargs}")
        downs = [downsamplers.create(cfg.downsampler, dim=d, stride=s, **cfg.downsampler_kwargs)
                 for d, s in zip(dims, strides)]
        crits = [MultiViewLoss(d, proj_dim=cfg.proj_dim, uncertainty=cfg.uncertainty,
                               tv_weight=cfg.tv_weight, crf_weight=cfg.crf_weight,
                               kernel_weight=cfg.kernel_weight) for d in dims]
        if len(dims) == 1:
            return cls(up, downs[0], crits[0])
        return cls(up, nn.ModuleList(downs), nn.ModuleList(crits), list(zip(dims, strides)))

    def forward(self, image: torch.Tensor, lr_feats: torch.Tensor, views: list[View],
                view_images: list[torch.Tensor], view_feats: list[torch.Tensor],
                generator: torch.Generator | None = None, which: int = 0) -> dict[str, torch.Tensor]:
        """Mean loss over views.

        Args:
            image: ``(B, 3, H, W)`` in [0, 1].  lr_feats: ``(B, C, h, w)`` = ``f(image)``.
            views: jitters; view_images[i] = ``t_i(image)`` ``(B, 3, H, W)``;
            view_feats[i] = ``f(t_i(image))`` ``(B, C, h, w)``.
            which: index of the backbone that made the features (several backbones).
        """
        ups = self._ups[which]
        down, crit = self.downsampler, self.criterion
        if isinstance(crit, nn.ModuleList):
            down, crit = down[which], crit[which]
        p = crit.proj_dim
        # Project once per step, before warping: P·t(F) = t(P·F) and pooling is per channel, so
        # every view then warps and pools proj_dim (+ guidance) channels instead of C (12x less
        # work for C=384; the warp's backward dominated the step otherwise). Both maps are linear
        # per pixel, so an upsampler that treats every channel alike applies them before
        # upsampling (``mix``): it then upsamples those few channels, not C.
        proj = (None if p is None else random_projection(crit.dim, p, generator,
                                                         device=lr_feats.device, dtype=lr_feats.dtype))
        with torch.no_grad():  # how many guidance maps has this downsampler? (one-pixel probe)
            probe = None if proj is None else down.guidance(lr_feats[:, :, :1, :1])
        n_guide = 0 if probe is None else probe.shape[1]
        guided = n_guide > 0

        def maps(hr: torch.Tensor) -> torch.Tensor:
            if proj is None:
                return hr
            return torch.cat([project(hr, proj), down.guidance(hr)], 1) if guided else project(hr, proj)

        if proj is not None and getattr(ups, "channel_separable", False):
            z = ups(lr_feats, image, mix=maps)
        else:
            z = maps(ups(lr_feats, image))
        c = z.shape[1] - n_guide
        guide = z[:, c:] if guided else None
        crf = crit.crf_weight > 0
        total: dict[str, torch.Tensor] = {}
        for view, x_v, f_v in zip(views, view_images, view_feats, strict=True):
            z_v = apply_view(z, view, output_size=tuple(x_v.shape[-2:]))
            out = crit(f_v, z_v[:, :c], down, generator, image=x_v if crf else None,
                       projection=proj, hr_projected=proj is not None,
                       guidance=z_v[:, c:] if guide is not None else None)
            for k in ("loss", "nll", "crf", "tv", "kernel"):
                total[k] = total.get(k, 0) + out[k] / len(views)
        return total
