"""Upsample Anything (Seo, Hamilton, Kim, arXiv 2511.16301): a training-free, per-image upsampler.

Every low-res cell ``q`` owns an anisotropic Gaussian (``σx, σy, θ``, in pixels / radians) and a
range width ``σr``. A pixel ``p`` mixes the k x k cells around its own cell with

    w(p <- q) = softmax_q( -½ dᵀ Σ_q⁻¹ d  -  |I(p) - I_lr(q)|² / (2 σr(q)²) ),
    Σ_q = R(θ_q) diag(σx², σy²) R(θ_q)ᵀ,   d = centre(q) - p  (pixels),

and ``out(p) = Σ_q w(p <- q) · F(q)`` (a joint bilateral upsampling whose spatial kernel is a 2D
Gaussian splat per cell). Per image, the 4 maps ``(σx, σy, θ, σr)`` of shape ``(B, ·, h, w)`` are
fitted by Adam so that the kernel rebuilds the image from its own low-res copy at the feature
grid (L1 loss); the same kernel then upsamples the features. It only *mixes* cells (no new
values), so it works for any backbone and needs no weights.

From the paper (as we read it; the arXiv text was not at hand, so via two detailed notes on it):
50 Adam steps, lr 1e-3, init ``σx = σy = 16`` px, ``θ = 0``, ``σr = 0.12`` (RGB in [0, 1]), L1
loss, the low-res image a bilinear resize of the image by the stride. We keep all of these
(raw, not log, parameters, so lr means what it means there). Where we differ:

- The image is fitted at the *feature* grid: the image padded like the backbone's input,
  ``(s·h, s·w)``, is rebuilt from its copy at ``(h, w)``, so cell ``q`` of the fit is feature
  cell ``q`` and the fitted maps apply to the features as they are.
- The window: the paper mixes "neighbouring" low-res positions; we found no size, and take
  ``k = 5`` cells (±2 cells: 2.3 σ at init for stride 16, 2.6 σ at 14). ``k=7`` rebuilds the
  image ~0.7 dB better at ~1.5x the cost, ``k=3`` ~1.5 dB worse.
- Taps outside the feature map get weight 0 (the softmax runs over the valid ones).
- ``downsample="area"`` (a box average per cell, what a patch embedding sees) is offered as
  an option; on the sample photos it rebuilt the image ~5 dB worse than the paper's bilinear
  copy (a point sample at the cell centre: ``F.interpolate`` without antialiasing reads the
  2 x 2 central pixels at an integer factor) and was no better on the feature check of
  ``benchmarks/bench_upsample_anything.py``, so the default stays ``"bilinear"``.
- CPU: the weights are one :func:`~upfeat.ops.cell_dot` (both log-kernels are quadratics in
  the pixel's position and colour with per-cell coefficients); the features are mixed by
  :func:`~upfeat.ops.cell_conv`, never as ``(B, C, k², H, W)``. The fit's 3-channel
  reconstruction uses :func:`mix_cells` (one matmul per cell), whose backward is several times
  faster there than ``cell_conv``'s.

Output sizes other than the image's: the kernel lives on the image's padded pixel grid; the
result there is box-averaged / bilinearly resized to the output grid and cropped, as
``JBUStack(last_step="resize")`` does (:class:`~upfeat.upsamplers.base.Geometry`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.cell_conv import cell_conv, cell_dot, cell_offsets, cell_valid
from ._registry import register_upsampler
from .base import Upsampler, resize_area

DOWNSAMPLES = ("bilinear", "area")
LOSSES = ("l1", "l2")
SIGMA_FLOOR = 1e-3  # σ² divides: keep the raw parameters away from 0 whatever Adam does


def downsample_image(image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(B, 3, s·h, s·w) -> (B, 3, h, w): cell box average (``area``) or the paper's ``bilinear``."""
    if mode == "area":
        return F.adaptive_avg_pool2d(image, size)
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def init_params(guide_lr: torch.Tensor, sigma_spatial: float, sigma_range: float) -> torch.Tensor:
    """Initial per-cell maps ``(σx, σy, θ, σr)``: (B, 4, h, w) (σ in pixels, θ in radians)."""
    B, _, h, w = guide_lr.shape
    p = torch.tensor([sigma_spatial, sigma_spatial, 0.0, sigma_range], dtype=guide_lr.dtype,
                     device=guide_lr.device)
    return p.view(1, 4, 1, 1).expand(B, 4, h, w).clone()


def _pixel_query(guide: torch.Tensor, s: int) -> torch.Tensor:
    """Per-pixel features of the one dot product the kernel is: (B, 10, s·h, s·w).

    ``[I (3), 1, |I|², x, y, x², y², x·y]`` with ``(x, y)`` the pixel centre in cell units,
    relative to the image centre (keeps the expanded quadratic well conditioned in float32).
    """
    B, _, H, W = guide.shape
    y = (torch.arange(H, device=guide.device, dtype=guide.dtype) + 0.5) / s - H / (2 * s)
    x = (torch.arange(W, device=guide.device, dtype=guide.dtype) + 0.5) / s - W / (2 * s)
    y, x = y.view(H, 1).expand(H, W), x.view(1, W).expand(H, W)
    pos = torch.stack([x, y, x * x, y * y, x * y]).expand(B, 5, H, W)
    return torch.cat([guide, torch.ones_like(guide[:, :1]), guide.pow(2).sum(1, keepdim=True), pos], 1)


def _cell_keys(params: torch.Tensor, guide_lr: torch.Tensor, s: int) -> torch.Tensor:
    """Per-cell coefficients matching :func:`_pixel_query`: (B, 10, h, w).

    ``<query(p), keys(q)> = -½ dᵀ Σ_q⁻¹ d - |I(p) - I_lr(q)|² / (2 σr(q)²)`` with ``d = c_q - p``
    (cell units): both terms are quadratics in p whose coefficients depend on q only.
    """
    B, _, h, w = params.shape
    sx, sy, th, sr = params.unbind(1)
    sx, sy, sr = (t.abs().clamp_min(SIGMA_FLOOR) for t in (sx, sy, sr))
    ix, iy = (s / sx) ** 2, (s / sy) ** 2  # 1/σ² in cell units
    cos, sin = torch.cos(th), torch.sin(th)
    # Σ⁻¹ = R diag(1/σx², 1/σy²) Rᵀ = [[a, b], [b, c]] in (x, y)
    a = cos * cos * ix + sin * sin * iy
    c = sin * sin * ix + cos * cos * iy
    b = cos * sin * (ix - iy)
    cy = (torch.arange(h, device=params.device, dtype=params.dtype) + 0.5 - h / 2).view(1, h, 1)
    cx = (torch.arange(w, device=params.device, dtype=params.dtype) + 0.5 - w / 2).view(1, 1, w)
    rho = 0.5 / sr**2
    sq = guide_lr.pow(2).sum(1)
    const = -0.5 * (a * cx * cx + c * cy * cy + 2 * b * cx * cy) - rho * sq
    return torch.cat([2 * rho[:, None] * guide_lr, torch.stack(
        [const, -rho, a * cx + b * cy, c * cy + b * cx, -0.5 * a, -0.5 * c, -b], 1)], 1)


def _mask(h: int, w: int, s: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """(s·h, s·w, k·k) additive mask: 0 for taps inside the map, -1e30 outside (softmax -> 0)."""
    valid = cell_valid(h, w, s, k, device=like.device).reshape(s * h, s * w, k * k)
    return torch.zeros(valid.shape, dtype=like.dtype, device=like.device).masked_fill_(~valid, -1e30)


def _weights(params: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, guide_lr: torch.Tensor,
             k: int, backend: str | None) -> torch.Tensor:
    """Softmax over the valid taps of ``cell_dot(query, keys(params))``: (B, H, W, k, k)."""
    B, _, H, W = query.shape
    s = H // guide_lr.shape[-2]
    logits = cell_dot(query, _cell_keys(params, guide_lr, s), k=k, backend=backend)
    return torch.softmax(logits.view(B, H, W, k * k) + mask, -1).view(B, H, W, k, k)


def ua_kernel(params: torch.Tensor, guide: torch.Tensor, guide_lr: torch.Tensor, k: int = 5,
              backend: str | None = None) -> torch.Tensor:
    """The Upsample-Anything weights from pixels to cells.

    Both log-kernels are quadratics in the pixel position / colour with per-cell coefficients,
    so all the per-tap logits are one :func:`~upfeat.ops.cell_dot` of 10-channel maps (no
    per-tap elementwise work at the high-res grid, and a cheap backward to the parameters).

    Args:
        params: (B, 4, h, w) per-cell ``(σx, σy, θ, σr)``, σx/σy in pixels of ``guide``.
        guide: (B, 3, s·h, s·w) the (padded) image.  guide_lr: (B, 3, h, w) its low-res copy.
        k: odd window size in cells.

    Returns:
        (B, s·h, s·w, k, k) weights summing to 1 over the valid taps (0 outside the map).
    """
    h, w = guide_lr.shape[-2:]
    s = guide.shape[-2] // h
    return _weights(params, _pixel_query(guide, s), _mask(h, w, s, k, guide), guide_lr, k, backend)


def mix_cells(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`~upfeat.ops.cell_conv` for a few channels, as one batched matmul per cell.

    (B, C, h, w), (B, s·h, s·w, k, k) -> (B, C, s·h, s·w). Each cell's s² pixels times its
    k² taps: ``(s², k²) @ (k², C)``; the unfold is at the low-res grid (k²·C·h·w, small). For
    the 3-channel image of the fit its backward is a few times faster than ``cell_conv``'s on
    CPU; for many channels ``cell_conv`` is faster (the channel-last result needs a transpose).
    """
    B, C, h, w = values.shape
    _, H, W, k, _ = weights.shape
    s = H // h
    cols = F.unfold(F.pad(values, [k // 2] * 4), k).view(B, C, k * k, h * w)
    cols = cols.permute(0, 3, 2, 1).reshape(B * h * w, k * k, C)
    wc = weights.reshape(B, h, s, w, s, k * k).permute(0, 1, 3, 2, 4, 5).reshape(B * h * w, s * s, k * k)
    out = torch.bmm(wc, cols).view(B, h, w, s, s, C)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def ua_kernel_reference(params: torch.Tensor, guide: torch.Tensor, guide_lr: torch.Tensor,
                        k: int = 5) -> torch.Tensor:
    """:func:`ua_kernel` literally (rotate each offset, divide by σ, per tap): tests only."""
    B, _, H, W = guide.shape
    h, w = guide_lr.shape[-2:]
    s, r = H // h, k // 2
    taps = F.unfold(F.pad(torch.cat([params, guide_lr], 1), [r] * 4, mode="replicate"), k)
    taps = taps.view(B, 7, k, k, h, w).repeat_interleave(s, 4).repeat_interleave(s, 5)
    sx, sy, th, sr = (t.abs().clamp_min(SIGMA_FLOOR) if i != 2 else t for i, t in enumerate(taps[:, :4].unbind(1)))
    off = cell_offsets(s, k, device=guide.device, dtype=guide.dtype) * s  # (s, s, k, k, 2) pixels
    off = off.permute(4, 2, 3, 0, 1).repeat(1, 1, 1, h, w)  # (2, k, k, H, W)
    dy, dx = off[0], off[1]
    along = torch.cos(th) * dx + torch.sin(th) * dy
    across = torch.cos(th) * dy - torch.sin(th) * dx
    d2 = (guide[:, :, None, None] - taps[:, 4:]).pow(2).sum(1)
    z = -0.5 * ((along / sx) ** 2 + (across / sy) ** 2) - d2 / (2 * sr**2)
    valid = cell_valid(h, w, s, k, device=guide.device).permute(2, 3, 0, 1)
    z = torch.where(valid, z, torch.finfo(z.dtype).min).permute(0, 3, 4, 1, 2)
    return torch.softmax(z.reshape(B, H, W, k * k), -1).view(B, H, W, k, k)


def fit_params(guide: torch.Tensor, size: tuple[int, int], steps: int = 50, lr: float = 1e-3,
               k: int = 5, sigma_spatial: float = 16.0, sigma_range: float = 0.12,
               downsample: str = "bilinear", loss: str = "l1", backend: str | None = None,
               history: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the per-cell maps so the kernel rebuilds ``guide`` from its ``size`` copy.

    Works under ``torch.inference_mode()`` / ``no_grad``: the fit runs on fresh copies with
    autograd re-enabled.

    Args:
        guide: (B, 3, s·h, s·w) image (padded to the stride).  size: the feature grid (h, w).
        steps, lr, k, sigma_spatial, sigma_range, downsample, loss: see :class:`UpsampleAnything`.
        history: if given, the loss before every step and after the last is appended.

    Returns:
        ``(params (B, 4, h, w), guide_lr (B, 3, h, w))``, both detached.
    """
    with torch.inference_mode(False), torch.enable_grad():
        guide = guide.detach().clone()  # a normal tensor even if the input is an inference one
        guide_lr = downsample_image(guide, size, downsample)
        params = init_params(guide_lr, sigma_spatial, sigma_range).requires_grad_(True)
        opt = torch.optim.Adam([params], lr=lr)
        s = guide.shape[-2] // size[0]
        query, mask = _pixel_query(guide, s), _mask(*size, s, k, guide)  # fixed during the fit

        def objective() -> torch.Tensor:
            rec = mix_cells(guide_lr, _weights(params, query, mask, guide_lr, k, backend))
            err = rec - guide
            return err.abs().mean() if loss == "l1" else err.pow(2).mean()

        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            value = objective()
            value.backward()
            opt.step()
            if history is not None:
                history.append(float(value.detach()))
        if history is not None:
            with torch.no_grad():
                history.append(float(objective()))
    return params.detach(), guide_lr.detach()


@register_upsampler("upsample_anything")
class UpsampleAnything(Upsampler):
    """Upsample Anything: per-image fitted anisotropic joint-bilateral kernels, no weights.

    Args:
        dim: feature channels.  stride: backbone stride.
        steps: Adam steps of the per-image fit (paper: 50).  lr: Adam learning rate (1e-3).
        k: odd window size in cells (5; see the module docstring).
        sigma_spatial: initial σx = σy in pixels (16).  sigma_range: initial σr (0.12).
        downsample: the low-res copy of the image: the paper's ``"bilinear"`` (default) or
            ``"area"`` (box average per cell).
        loss: ``"l1"`` (paper) or ``"l2"`` reconstruction loss.
        backend: :func:`~upfeat.ops.adaptive_conv` backend (None: the fastest available).

    Shape:
        feats (B, dim, ceil(H/s), ceil(W/s)), image (B, 3, H, W) in [0, 1] -> (B, dim, H', W').

    Example:
        >>> up = UpsampleAnything(dim=8, stride=14, steps=2)
        >>> up(torch.rand(1, 8, 3, 4), torch.rand(1, 3, 40, 56)).shape
        torch.Size([1, 8, 40, 56])
    """

    def __init__(self, dim: int, stride: int, steps: int = 50, lr: float = 1e-3, k: int = 5,
                 sigma_spatial: float = 16.0, sigma_range: float = 0.12, downsample: str = "bilinear",
                 loss: str = "l1", backend: str | None = None) -> None:
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if not (isinstance(k, int) and k >= 1 and k % 2 == 1):
            raise ValueError(f"k must be a positive odd int, got {k!r}")
        if not (lr >= 0 and sigma_spatial > 0 and sigma_range > 0):
            raise ValueError(f"lr must be >= 0 and the sigmas > 0, got lr={lr!r}, "
                             f"sigma_spatial={sigma_spatial!r}, sigma_range={sigma_range!r}")
        if downsample not in DOWNSAMPLES or loss not in LOSSES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES} and loss one of {LOSSES}, "
                             f"got {downsample!r}, {loss!r}")
        super().__init__(dim, stride, steps=steps, lr=float(lr), k=k,
                         sigma_spatial=float(sigma_spatial), sigma_range=float(sigma_range),
                         downsample=downsample, loss=loss, backend=backend)
        self.steps, self.lr, self.k, self.backend = steps, float(lr), k, backend
        self.sigma_spatial, self.sigma_range = float(sigma_spatial), float(sigma_range)
        self.downsample, self.loss = downsample, loss

    def fit(self, guide: torch.Tensor, size: tuple[int, int],
            history: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`fit_params` with this upsampler's options."""
        return fit_params(guide, size, self.steps, self.lr, self.k, self.sigma_spatial,
                          self.sigma_range, self.downsample, self.loss, self.backend, history)

    def forward(self, feats: torch.Tensor, image: torch.Tensor,
                output_size: tuple[int, int] | None = None) -> torch.Tensor:
        geo = self.geometry(feats, image, output_size)
        guide = geo.pad_image(image).to(feats.dtype)
        params, guide_lr = self.fit(guide, geo.feat)
        with torch.no_grad():
            weights = ua_kernel(params, guide, guide_lr, self.k, self.backend)
        out = cell_conv(feats, weights, backend=self.backend)  # differentiable in feats only
        return geo.crop(resize_area(out, geo.grid))
