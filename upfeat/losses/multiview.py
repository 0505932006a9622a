"""FeatUp's multi-view reconstruction loss for one view, with its optional regularisers."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import ShapeError, check_floating, check_shape
from .nll import ScaleNet, gaussian_nll
from .projection import project, random_projection
from .regularizers import bilateral_smoothness, kernel_magnitude, tv_loss


class MultiViewLoss(nn.Module):
    """Loss of one jittered view: ``σ↓(t(F_hr))`` must reproduce ``f(t(x))``.

    Per call: downsample ``hr_view`` to the target grid, project both to a fresh random
    ``proj_dim``-subspace (``None``: no projection), predict ``log σ`` from the *full* target with
    a :class:`ScaleNet` (``uncertainty=False``: σ = 1), and add
    ``tv_weight * tv(P hr_view) + crf_weight * bilateral(P hr_view, image)
    + kernel_weight * kernel_magnitude(downsampler.spatial_kernel())``. Defaults give the pure NLL;
    FeatUp's JBU training uses ``crf_weight=0.001``, the implicit upsampler a TV prior.

    Its parameters (the ScaleNet) must be optimised with the upsampler and downsampler.

    Args (forward):
        lr_target: ``(B, C, h, w)`` backbone features of the jittered image, ``f(t(x))``.
        hr_view: ``(B, C, H, W)`` high-res features already jittered, ``t(F_hr)``, covering the
            same pixels as ``t(x)`` so that ``downsampler(hr_view)`` is ``(B, C, h, w)``.
        downsampler: an :class:`upfeat.downsamplers.Downsampler` (called as
            ``ds(hr, output_size)``).
        generator: randomness of the projection and CRF sampling (``None``: torch's default).
        image: ``(B, 3, H, W)`` jittered image ``t(x)``; required iff ``crf_weight > 0``.

    Returns:
        dict with scalar tensors ``loss`` (to backpropagate), ``nll``, ``tv``, ``crf``,
        ``kernel`` (regulariser values, unweighted) and ``log_sigma`` ``(B, 1, h, w)`` (detached).

    Example:
        >>> from upfeat.downsamplers import SimpleDownsampler
        >>> crit = MultiViewLoss(8, proj_dim=4)
        >>> out = crit(torch.rand(2, 8, 3, 4), torch.rand(2, 8, 48, 64), SimpleDownsampler(16))
        >>> sorted(out), out["loss"].shape
        (['crf', 'kernel', 'log_sigma', 'loss', 'nll', 'tv'], torch.Size([]))
    """

    def __init__(self, dim: int, proj_dim: int | None = 30, uncertainty: bool = True,
                 tv_weight: float = 0.0, crf_weight: float = 0.0, kernel_weight: float = 0.0,
                 crf_samples: int = 1000) -> None:
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if proj_dim is not None and not (isinstance(proj_dim, int) and proj_dim >= 1):
            raise ValueError(f"proj_dim must be an int >= 1 or None, got {proj_dim!r}")
        for name, v in (("tv_weight", tv_weight), ("crf_weight", crf_weight),
                        ("kernel_weight", kernel_weight)):
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        self.dim, self.proj_dim = dim, proj_dim
        self.scale_net = ScaleNet(dim) if uncertainty else None
        self.tv_weight, self.crf_weight, self.kernel_weight = tv_weight, crf_weight, kernel_weight
        self.crf_samples = crf_samples

    def forward(self, lr_target: torch.Tensor, hr_view: torch.Tensor, downsampler: nn.Module,
                generator: torch.Generator | None = None, image: torch.Tensor | None = None, *,
                projection: torch.Tensor | None = None, hr_projected: bool = False,
                guidance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See the class docstring. Keyword-only arguments give training's fast path:

        ``projection`` ``(C, proj_dim)`` replaces the fresh random one (e.g. one per step, shared
        by all views); with ``hr_projected=True`` ``hr_view`` is already ``P·t(F_hr)``
        ``(B, proj_dim, H, W)`` and ``guidance`` is ``t(downsampler.guidance(F_hr))``. Projection,
        warp and pooling are all linear per channel and the guidance is linear per pixel, so this
        equals the plain call with the same projection at ``proj_dim / C`` of the cost.
        """
        for name, t, dims in (("lr_target", lr_target, ["B", "C", "h", "w"]),
                              ("hr_view", hr_view, ["B", "C", "H", "W"])):
            check_shape(t, dims, name)
            check_floating(t, name)
        if lr_target.shape[1] != self.dim:
            raise ShapeError(f"lr_target must have {self.dim} channels, got shape "
                             f"{tuple(lr_target.shape)}")
        if hr_projected and (projection is None or self.proj_dim is None):
            raise ValueError("hr_projected=True needs projection=(C, proj_dim) and a proj_dim")
        if projection is not None and (self.proj_dim is None or tuple(projection.shape) !=
                                       (self.dim, self.proj_dim)):
            raise ShapeError(f"projection must have shape ({self.dim}, {self.proj_dim}), got "
                             f"{tuple(projection.shape)}")
        want = self.proj_dim if hr_projected else self.dim
        if hr_view.shape[1] != want:
            raise ShapeError(f"hr_view must have {want} channels"
                             f"{' (already projected)' if hr_projected else ''}, got shape "
                             f"{tuple(hr_view.shape)}")
        if hr_view.shape[0] != lr_target.shape[0]:
            raise ShapeError(f"hr_view batch {hr_view.shape[0]} != lr_target batch "
                             f"{lr_target.shape[0]}")
        if self.crf_weight > 0 and image is None:
            raise ValueError("crf_weight > 0 needs image=(B, 3, H, W), the jittered image t(x)")
        kw = {} if guidance is None else {"guidance": guidance}
        down = downsampler(hr_view, output_size=tuple(lr_target.shape[-2:]), **kw)
        if down.shape[-2:] != lr_target.shape[-2:]:
            raise ShapeError(f"downsampler(hr_view) has shape {tuple(down.shape)}, expected "
                             f"lr_target's grid {tuple(lr_target.shape[-2:])}")
        log_sigma = (self.scale_net(lr_target) if self.scale_net is not None
                     else lr_target.new_zeros(lr_target.shape[0], 1, *lr_target.shape[-2:]))
        target, pred, hr = lr_target, down, hr_view
        if self.proj_dim is not None:
            proj = projection if projection is not None else random_projection(
                self.dim, self.proj_dim, generator, device=hr_view.device, dtype=hr_view.dtype)
            target = project(lr_target, proj)
            if not hr_projected:
                pred = project(down, proj)
                if self.tv_weight > 0 or self.crf_weight > 0:
                    hr = project(hr_view, proj)
        nll = gaussian_nll(target, pred, log_sigma)
        zero = nll.new_zeros(())
        tv = tv_loss(hr) if self.tv_weight > 0 else zero
        crf = (bilateral_smoothness(hr, image, self.crf_samples, generator)
               if self.crf_weight > 0 else zero)
        kern = (kernel_magnitude(downsampler.spatial_kernel())
                if self.kernel_weight > 0 else zero)
        loss = nll + self.tv_weight * tv + self.crf_weight * crf + self.kernel_weight * kern
        return {"loss": loss, "nll": nll, "tv": tv, "crf": crf, "kernel": kern,
                "log_sigma": log_sigma.detach()}
