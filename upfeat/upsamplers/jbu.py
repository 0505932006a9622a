"""FeatUp's joint bilateral upsampler: :class:`JBULayer` (one guided step) and :class:`JBUStack`.

One step: bicubic-upsample the features to the output size, then replace every pixel by a
weighted mean of its ``(2r+1)^2`` neighbours, the weights being ``softmax(exp(τ)·<g_p, g_q>)``
over the window (``g`` = a small learned projection of the image) times a spatial Gaussian,
renormalised (:func:`upfeat.ops.jbu_kernel`), plus a learned 0.1-scaled kernel correction
("fixup"). The weighted mean is :func:`upfeat.ops.adaptive_conv`, which never builds the
``(B, C, k*k, H, W)`` unfold.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import ShapeError, check_floating, check_shape
from ..ops import adaptive_conv, band_matmul, can_run, jbu_kernel
from ..ops.adaptive_conv import cpu
from ..ops.jbu_kernel import RANGE_KERNELS
from ._registry import register_upsampler
from .base import Upsampler, check_size, resize_area

FIXUPS = ("zero_sum", "featup", "none")
Sink = Callable[[torch.Tensor, int], None]  # sink(block (B, c, H, W), c0): channels c0:c0+c
CHANNEL_GROUP = 64
"""Channels a :class:`JBULayer` upsamples at a time under ``torch.inference_mode`` (the peak
memory of a step then grows with ``CHANNEL_GROUP``, not with C: ``upfeat.inference.memory``)."""


def _empty(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    # the C++ kernels' output pool where they run: a fresh 300 MB result faults in (and zeroes)
    # ~75k pages, as long as the adaptive conv that fills it
    if like.dtype in (torch.float32, torch.float64) and can_run("cpp", like.device):
        return cpu.empty(shape, like)
    return like.new_empty(shape)


def _bicubic_matrix(n_in: int, n_out: int, r: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out + 2r, n_in): 1-D bicubic resize (align_corners=False) then reflect-pad by r."""
    # Resizing an identity along one axis (the other keeps its size: exact identity) gives
    # F.interpolate's own coefficients; padding then just repeats rows.
    eye = torch.eye(n_in, device=like.device, dtype=torch.float32).view(1, 1, n_in, n_in)
    a = F.interpolate(eye, size=(n_out, n_in), mode="bicubic", align_corners=False)[0, 0]
    i = torch.arange(-r, n_out + r, device=like.device)
    if n_out > r:  # reflection (FeatUp's choice) needs r < side; else edge replication
        i = torch.where(i < 0, -i, torch.where(i >= n_out, 2 * (n_out - 1) - i, i))
    return a[i.clamp(0, n_out - 1)].to(like.dtype)


def bicubic_padded(x: torch.Tensor, size: tuple[int, int], r: int) -> torch.Tensor:
    """``pad(F.interpolate(x, size, mode="bicubic"), r, mode="reflect")`` as one banded product.

    (B, C, h, w) -> (B, C, H+2r, W+2r). Bicubic resizing is separable and linear, so it is
    ``A_h @ x @ A_w^T`` with the padding folded into the small matrices, each row 4 non-zeros:
    :func:`~upfeat.ops.band_matmul` spends 4 multiply-adds per output and axis (dense matmuls
    spent h and w).
    """
    (h, w), (H, W) = x.shape[-2:], size
    return band_matmul(x, _bicubic_matrix(h, H, r, x), _bicubic_matrix(w, W, r, x))


class Conv1x1(nn.Conv2d):
    """``nn.Conv2d(in_ch, out_ch, 1)`` (same parameters and state dict) run as one batched matmul.

    oneDNN's CPU path for these small, odd channel counts (3->32, 52->49 at full resolution) is
    1.5-10x slower than a GEMM forward+backward, and these convs dominate a low-dim JBU's cost.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        w = self.weight.view(1, self.out_channels, self.in_channels).expand(B, -1, -1)
        y = torch.baddbmm(self.bias.view(1, -1, 1), w, x.reshape(B, self.in_channels, H * W))
        return y.view(B, self.out_channels, H, W)


class JBULayer(nn.Module):
    """One joint-bilateral upsampling step (×2 by default, any ``output_size`` allowed).

    Args:
        dim: feature channels C (``None``: any, no parameter depends on it).  guidance_dim: guidance channels (3 for RGB).
        range_dim: channels of the range projection ``proj(guidance)``.
        radius: window radius r (k = 2r+1 taps per side).
        kernel_fixup: ``"zero_sum"`` (default): ``w += 0.1·(fix - mean_taps fix)`` so the kernel still
            sums to 1 and constant features stay constant; ``"featup"``: FeatUp's ``w += 0.1·fix``
            (kernel sums drift from 1); ``"none"``: no fixup.  ``fix`` is a 1x1-conv MLP of
            (kernel taps, guidance).
        dropout: Dropout2d rate inside the range projection and the fixup (FeatUp: 0.1).
        range_kernel: ``"dot"`` (FeatUp: ``softmax(t·<g_p, g_q>)`` over ``g = proj(guidance)``)
            or ``"distance"``: ``exp(-t·|g_p - g_q|²/2)`` over ``g = [guidance, proj(guidance)]``
            with the projection's last layer scaled by 0.1, so the layer starts close to a classic
            colour bilateral filter (edge-aware from step 0) and learns extra range features.
        temperature, sigma: initial range temperature ``t`` and spatial width (window units).

    Shape:
        feats (B, C, h, w), guidance (B, guidance_dim, *, *) -> (B, C, H', W') with
        ``(H', W') = output_size or (2h, 2w)``; the guidance is box-averaged to ``(H', W')``.
    """

    def __init__(self, dim: int | None, guidance_dim: int = 3, range_dim: int = 32, radius: int = 3,
                 kernel_fixup: str = "zero_sum", dropout: float = 0.1, range_kernel: str = "dot",
                 temperature: float = 1.0, sigma: float = 1.0) -> None:
        super().__init__()
        if range_kernel not in RANGE_KERNELS:
            raise ValueError(f"range_kernel must be one of {RANGE_KERNELS}, got {range_kernel!r}")
        if not (temperature > 0 and sigma > 0):
            raise ValueError(f"temperature and sigma must be > 0, got {temperature!r}, {sigma!r}")
        if kernel_fixup not in FIXUPS:
            raise ValueError(f"kernel_fixup must be one of {FIXUPS}, got {kernel_fixup!r}")
        if not (isinstance(radius, int) and radius >= 1):
            raise ValueError(f"radius must be a positive int, got {radius!r}")
        self.dim, self.guidance_dim, self.radius, self.fixup_mode = dim, guidance_dim, radius, kernel_fixup
        self.range_kernel = range_kernel
        self.k = 2 * radius + 1
        k2 = self.k**2
        self.range_proj = nn.Sequential(Conv1x1(guidance_dim, range_dim), nn.GELU(),
                                        nn.Dropout2d(dropout), Conv1x1(range_dim, range_dim))
        if range_kernel == "distance":
            # Small, not zero: at g ≡ const the distance logits have zero gradient in g (a saddle
            # the learned features would never leave). x0.1 starts near the colour filter.
            with torch.no_grad():
                self.range_proj[-1].weight.mul_(0.1)
                self.range_proj[-1].bias.zero_()
        # log temperature: exp keeps it positive
        self.range_temp = nn.Parameter(torch.tensor(math.log(temperature)))
        self.sigma_spatial = nn.Parameter(torch.tensor(float(sigma)))  # window units: 1 = the radius
        self.kernel_fixup = None if kernel_fixup == "none" else nn.Sequential(
            Conv1x1(guidance_dim + k2, k2), nn.GELU(), nn.Dropout2d(dropout), Conv1x1(k2, k2))

    def temperature(self) -> torch.Tensor:
        """``exp(τ)`` clamped to ``[1e-4, 1e4]`` as in FeatUp."""
        return self.range_temp.exp().clamp(1e-4, 1e4)

    def sigma(self) -> torch.Tensor:
        """Spatial width; the sign is irrelevant (σ² is used), the floor avoids 0/0 at σ = 0."""
        return self.sigma_spatial.abs().clamp_min(1e-2)

    def range_features(self, guidance: torch.Tensor) -> torch.Tensor:
        """``g`` of the range kernel: ``(B, range_dim[+guidance_dim], H, W)``."""
        g = self.range_proj(guidance)
        return torch.cat([guidance.to(g.dtype), g], 1) if self.range_kernel == "distance" else g

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """Per-pixel weights ``(B, H, W, k, k)`` for guidance ``(B, guidance_dim, H, W)``.

        A tap-major view, which :func:`~upfeat.ops.adaptive_conv` reads without a copy.
        """
        w = jbu_kernel(self.range_features(guidance), self.temperature(), self.sigma(), k=self.k,
                       range_kernel=self.range_kernel)
        if self.kernel_fixup is None:
            return w
        B, H, W, k, _ = w.shape
        taps = w.permute(0, 3, 4, 1, 2).reshape(B, k * k, H, W)  # free: w is tap-major
        # taps is ours (a fresh view of jbu_kernel's result): without autograd, fix it in place
        return self.fixup(taps, guidance, inplace=True).view(B, k, k, H, W).permute(0, 3, 4, 1, 2)

    def fixup(self, taps: torch.Tensor, guidance: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``taps + 0.1·fix`` (``fix`` centred over the taps for ``"zero_sum"``), (B, k*k, H, W).

        ``fix = conv2(drop(gelu(conv1([taps, guidance]))))`` computed without the concatenation
        (conv1 split by input) and with the centring, the 0.1 and the final add folded into
        conv2's weights (``fix - mean_t fix = (W2 - mean_t W2)·h + (b2 - mean b2)``): two
        matmuls and one bias pass over the full-resolution taps instead of seven passes.
        ``inplace``: without autograd (eval, no grad), overwrite ``taps`` with the result.
        """
        c1, act, drop, c2 = self.kernel_fixup
        B, k2, H, W = taps.shape
        w1 = c1.weight.view(c1.out_channels, c1.in_channels)
        x1 = w1[:, k2:] @ guidance.to(taps.dtype).reshape(B, -1, H * W) + c1.bias.view(-1, 1)
        w2, b2 = c2.weight.view(c2.out_channels, c2.in_channels), c2.bias
        if self.fixup_mode == "zero_sum":
            w2, b2 = w2 - w2.mean(0, keepdim=True), b2 - b2.mean()
        t = taps.reshape(B, k2, H * W)
        if inplace and not (torch.is_grad_enabled() or self.training) \
                and isinstance(act, nn.GELU) and act.approximate == "none":
            # inference: in place on x1 and on taps (the caller's, with inplace=True), no
            # full-resolution temporaries (each costs a pass and ~10k freshly faulted pages at 448²)
            hid = torch.ops.aten.gelu_(x1.baddbmm_(w1[:, :k2].expand(B, -1, -1), t))
            out = t.baddbmm_((0.1 * w2).expand(B, -1, -1), hid).add_(0.1 * b2.view(-1, 1))
            return out.view(B, k2, H, W)
        hid = drop(act(torch.baddbmm(x1, w1[:, :k2].expand(B, -1, -1), t).view(B, -1, H, W)))
        out = torch.baddbmm(t + 0.1 * b2.view(-1, 1), (0.1 * w2).expand(B, -1, -1),
                            hid.reshape(B, -1, H * W))
        return out.view(B, k2, H, W)

    def forward(self, feats: torch.Tensor, guidance: torch.Tensor,
                output_size: tuple[int, int] | None = None,
                sink: Sink | None = None) -> torch.Tensor | None:
        """Upsample ``feats``; with ``sink``, hand the result over as ``sink(block, c0)``
        (channels ``c0:c0 + block.shape[1]``) instead of returning it: under
        ``torch.inference_mode`` one :data:`CHANNEL_GROUP` at a time, so the full result is
        never held."""
        f = check_shape(feats, ["B", "C", "h", "w"], "feats")
        g = check_shape(guidance, ["B", "D", "H", "W"], "guidance")
        check_floating(feats, "feats")
        check_floating(guidance, "guidance")
        if self.dim not in (None, f["C"]) or g["D"] != self.guidance_dim or f["B"] != g["B"]:
            raise ShapeError(f"JBULayer(dim={self.dim}, guidance_dim={self.guidance_dim}) got feats "
                             f"{tuple(feats.shape)} and guidance {tuple(guidance.shape)}")
        size = (2 * f["h"], 2 * f["w"]) if output_size is None else check_size(output_size)
        group = CHANNEL_GROUP if torch.is_inference_mode_enabled() else f["C"]
        if group >= f["C"]:
            up = bicubic_padded(feats, size, self.radius)
            out = adaptive_conv(up, self.kernel(resize_area(guidance, size)))
            if sink is None:
                return out
            sink(out, 0)
            return None
        # Inference: the kernel is shared by all channels, so the padded bicubic map (the
        # largest intermediate, C x (H+2r) x (W+2r)) is only built for a few channels at a time;
        # same result, ~half the peak memory of one full-resolution step.
        w = self.kernel(resize_area(guidance, size))
        out = _empty(feats, (f["B"], f["C"], *size)) if sink is None else None
        for c0 in range(0, f["C"], group):
            up = bicubic_padded(feats[:, c0:c0 + group], size, self.radius)
            if out is None:
                sink(adaptive_conv(up, w), c0)
            else:  # straight into the output's channel slice: no block, no copy
                adaptive_conv(up, w, out=out[:, c0:c0 + group])
            del up
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, radius={self.radius}, kernel_fixup={self.fixup_mode!r}, "
                f"range_kernel={self.range_kernel!r}")


@register_upsampler("jbu_stack")
class JBUStack(Upsampler):
    """FeatUp's JBU stack for any stride and image size, plus ``x + 0.1·conv1x1(dropout(x))``.

    ``n = ceil(log2(stride))`` layers: ×2 steps, then (``last_step="jbu"``, default) a last step
    straight to the output grid, ×``stride/2^(n-1)`` (×2 for strides 8/16/32, ×1.75 for 14:
    16→32→64→128→224 tokens at 224 px); or (``last_step="resize"``) n ×2 steps to ``h·2^n`` and
    a box-average resize to the output grid (16→…→256→224). Guidance per step: the image padded
    like the backbone's input and box-averaged to the step's size.

    Args:
        dim: feature channels.  stride: backbone stride.  range_dim, radius, kernel_fixup,
        dropout, range_kernel, temperature, sigma: see :class:`JBULayer`. The defaults start
            every layer as a colour bilateral filter (``σ_range = 1/sqrt(400) = 0.05`` in [0, 1]
            RGB, ``σ_spatial = 0.5·r`` pixels of the step's grid). FeatUp's own choice,
            ``range_kernel="dot", temperature=1, sigma=1``, starts as a near-isotropic blur with a
            weak random range kernel that training barely sharpens: on a CamVid linear probe it
            stayed below bilinear (docs/method.md).
        residual_dropout: Dropout2d before the final 1x1 conv.
        last_step: ``"jbu"`` or ``"resize"`` (see above).
        residual: ``False`` drops the ``dim x dim`` conv, the only feature-specific part: the
            stack is then *backbone-agnostic* (kernels from the image alone, no parameter shaped
            by ``dim``), one state dict serves every backbone (:meth:`for_backbone`).
        steps: layers built (default ``ceil(log2(stride))``). A stride needing ``n`` steps runs
            the *last* ``n`` layers, so each layer always works at the same scale relative to the
            output (the last at full resolution): an agnostic stack built with ``steps=5`` serves
            strides 2 to 32.

    Shape:
        feats (B, dim, ceil(H/s), ceil(W/s)), image (B, 3, H, W) in [0, 1] -> (B, dim, H', W').
    """

    def __init__(self, dim: int, stride: int, range_dim: int = 32, radius: int = 3,
                 kernel_fixup: str = "zero_sum", dropout: float = 0.1,
                 residual_dropout: float = 0.2, last_step: str = "jbu",
                 range_kernel: str = "distance", temperature: float = 400.0,
                 sigma: float = 0.5, residual: bool = True, steps: int | None = None) -> None:
        n = self.steps_for(stride)
        steps = n if steps is None else steps
        if not (isinstance(steps, int) and steps >= n):
            raise ValueError(f"steps must be an int >= ceil(log2(stride)) = {n}, got {steps!r}")
        super().__init__(dim, stride, range_dim=range_dim, radius=radius, kernel_fixup=kernel_fixup,
                         dropout=dropout, residual_dropout=residual_dropout, last_step=last_step,
                         range_kernel=range_kernel, temperature=temperature, sigma=sigma,
                         residual=residual, steps=steps)
        if last_step not in ("jbu", "resize"):
            raise ValueError(f"last_step must be 'jbu' or 'resize', got {last_step!r}")
        self.last_step = last_step
        self.layers = nn.ModuleList(
            JBULayer(None, 3, range_dim, radius, kernel_fixup, dropout, range_kernel, temperature, sigma)
            for _ in range(steps))
        self.residual = (nn.Sequential(nn.Dropout2d(residual_dropout), nn.Conv2d(dim, dim, 1))
                         if residual else None)

    @staticmethod
    def steps_for(stride: int) -> int:
        """×2 steps a stride needs: ``ceil(log2(stride))``, at least 1."""
        return max(1, math.ceil(math.log2(stride)))

    @property
    def agnostic(self) -> bool:
        """True without the residual conv: no parameter depends on ``dim`` or ``stride``."""
        return self.residual is None

    def for_backbone(self, dim: int, stride: int, share: bool = False) -> JBUStack:
        """This stack for features of another ``dim`` / ``stride`` (agnostic stacks only).

        ``share=False``: a copy of the weights; ``True``: the same layer modules (training one
        upsampler on several backbones).
        """
        if not self.agnostic:
            raise ValueError("only a stack built with residual=False serves other backbones")
        if self.steps_for(stride) > len(self.layers):
            raise ValueError(f"stride {stride} needs {self.steps_for(stride)} steps; this stack "
                             f"has {len(self.layers)} layers")
        with torch.random.fork_rng(devices=[]):  # the fresh layers' init must not move the caller's RNG
            other = type(self)(dim, stride, **self._cfg)
        if share:
            other.layers = self.layers
        else:
            other.load_state_dict(self.state_dict())
        return other.train(self.training)

    @property
    def channel_separable(self) -> bool:
        """Whether ``forward(mix=...)`` applies ``mix`` at the features' resolution (see there)."""
        return self.layers[0].fixup_mode != "featup" or self.residual is None

    def forward(self, feats: torch.Tensor, image: torch.Tensor,
                output_size: tuple[int, int] | None = None,
                mix: Callable[[torch.Tensor], torch.Tensor] | None = None,
                sink: Sink | None = None) -> torch.Tensor | None:
        """Upsample; with ``mix`` (a per-pixel linear map of channels, e.g. training's random
        projection C -> 30) return ``mix(upsampled)``. Every step after the residual applies one
        spatial operator to each channel alike, so it commutes with ``mix``: when
        :attr:`channel_separable`, ``mix`` runs on the low-res features and the steps upsample
        its few channels instead of C (same result up to rounding, C/30 times less work).

        ``sink``: hand the result over in channel blocks, ``sink(block, c0)``, and return
        ``None``; under ``torch.inference_mode`` the last step then never holds the whole
        ``(B, dim, H', W')`` result (:meth:`JBULayer.forward`)."""
        geo = self.geometry(feats, image, output_size)
        image = geo.pad_image(image).to(feats.dtype)
        # Every step maps each channel by the same spatial operator whose rows sum to 1 (unless
        # kernel_fixup="featup"), so it commutes with the 1x1 conv and maps constants to
        # themselves: x + 0.1 conv(x) is identical before or after upsampling, and ~h*w/(H*W)
        # times cheaper before (7.4 GMAC -> 0.04 for C=384 at 224 px). Channel dropout commutes too.
        early = self.channel_separable
        (h, w), x = geo.feat, feats
        if early and self.residual is not None:
            x = x + 0.1 * self.residual(x)
        if early and mix is not None:
            x, mix = mix(x), None
        layers = self.layers[len(self.layers) - self.steps_for(self.stride):]
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1 and self.last_step == "jbu"
            size = geo.grid if last else (h << (i + 1), w << (i + 1))
            if last and sink is not None and early and mix is None:  # nothing left to mix
                return layer(x, resize_area(image, size), size,
                             sink=lambda block, c0: sink(geo.crop(block), c0))
            x = layer(x, resize_area(image, size), size)
        x = geo.crop(resize_area(x, geo.grid))  # resize: no-op unless last_step="resize"
        x = x if early else x + 0.1 * self.residual(x)
        x = x if mix is None else mix(x)
        if sink is None:
            return x
        sink(x, 0)
        return None
