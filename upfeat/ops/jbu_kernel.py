"""The joint bilateral upsampling kernel: a range kernel from guidance features times a spatial
Gaussian, normalised over each pixel's k x k window.

``w[b,i,j,u,v] ∝ softmax_{u,v}(temperature * <g[b,:,i,j], g_pad[b,:,i+u,j+v]>) * exp(-d²/(2σ²))``
(FeatUp's dot-product range kernel) or, with ``range_kernel="distance"``, the classic bilateral
range kernel ``exp(-temperature * ||g_p - g_q||² / 2)``, which unlike the dot product does not
favour neighbours with a large ``||g_q||`` (bright pixels, for a colour-like guidance).

with ``d`` the offset (u-r, v-r) / r (window coordinates in [-1, 1], as in FeatUp, so σ=1 means
"about the window's radius"). Because ``softmax(l) * s / Σ softmax(l) * s == softmax(l + log s)``,
the product and its renormalisation are one softmax over ``l + log s``: exact, no division by a
tiny sum. The logits come from :func:`~upfeat.ops.local_dot`, so nothing of size (B, D, k*k, H, W)
is ever built; every intermediate is (B, k*k, H, W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import ShapeError, check_floating, check_shape
from .adaptive_conv import choose_backend, cpu, local_dot
from .adaptive_conv.reference import local_dot_reference


def spatial_log_kernel(k: int, sigma: torch.Tensor | float, device=None, dtype=None) -> torch.Tensor:
    """Log of the spatial Gaussian over a k x k window: ``-d²/(2σ²)``, shape (k*k,).

    Example:
        >>> spatial_log_kernel(3, 1.0).view(3, 3) + 0.0  # + 0.0: the centre prints as 0, not -0
        tensor([[-1.0000, -0.5000, -1.0000],
                [-0.5000,  0.0000, -0.5000],
                [-1.0000, -0.5000, -1.0000]])
    """
    sigma = torch.as_tensor(sigma, device=device, dtype=dtype)
    r = max(k // 2, 1)
    d = torch.arange(k, device=sigma.device, dtype=sigma.dtype) - k // 2
    d2 = ((d[:, None] ** 2 + d[None, :] ** 2) / r**2).reshape(k * k)
    return -d2 / (2 * sigma**2)


def _pad(g: torch.Tensor, r: int) -> torch.Tensor:
    # Reflection needs r < H, W; tiny guidance maps fall back to edge replication.
    mode = "reflect" if min(g.shape[-2:]) > r else "replicate"
    return F.pad(g, [r, r, r, r], mode=mode)


RANGE_KERNELS = ("dot", "distance")


def _check(guidance: torch.Tensor, k: int, temperature, sigma, range_kernel: str = "dot") -> None:
    if range_kernel not in RANGE_KERNELS:
        raise ValueError(f"range_kernel must be one of {RANGE_KERNELS}, got {range_kernel!r}")
    check_shape(guidance, ["B", "D", "H", "W"], "guidance")
    check_floating(guidance, "guidance")
    if k < 1 or k % 2 == 0:
        raise ShapeError(f"kernel size k must be odd and positive, got {k}")
    # σ <= 0 or a non-finite temperature would give NaN weights without any error.
    s, t = torch.as_tensor(sigma).detach(), torch.as_tensor(temperature).detach()
    if s.numel() != 1 or not bool(s > 0):
        raise ValueError(f"sigma must be one positive number, got {sigma!r}")
    if t.numel() != 1 or not bool(torch.isfinite(t)):
        raise ValueError(f"temperature must be one finite number, got {temperature!r}")


def jbu_kernel(
    guidance: torch.Tensor,
    temperature: torch.Tensor | float,
    sigma: torch.Tensor | float,
    k: int = 7,
    backend: str | None = None,
    range_kernel: str = "dot",
) -> torch.Tensor:
    """Normalised JBU weights for every pixel of ``guidance``.

    Args:
        guidance: (B, D, H, W) guidance features (e.g. a 1x1-conv projection of the image).
        temperature: positive scalar multiplying the dot products (FeatUp: ``exp(τ)``).
        sigma: positive scalar, spatial Gaussian width in window units.
        k: odd window size.
        backend: backend of :func:`~upfeat.ops.local_dot`.
        range_kernel: ``"dot"`` (FeatUp) or ``"distance"`` (``-||g_p - g_q||² / 2`` logits).

    Returns:
        (B, H, W, k, k) weights summing to 1 over the last two dims; a view of a tap-major
        (B, k, k, H, W) tensor, which :func:`~upfeat.ops.adaptive_conv` consumes without a copy.

    Example:
        >>> w = jbu_kernel(torch.randn(2, 8, 5, 6), 1.0, 1.0, k=3, backend="shift")
        >>> w.shape, torch.allclose(w.sum((-1, -2)), torch.ones(2, 5, 6))
        (torch.Size([2, 5, 6, 3, 3]), True)
    """
    _check(guidance, k, temperature, sigma, range_kernel)
    B, _, H, W = guidance.shape
    query, keys = guidance, guidance
    if range_kernel == "distance":
        # -|g_p - g_q|²/2 = <g_p, g_q> - |g_q|²/2 - |g_p|²/2, and the last term is constant over
        # the window (cancels in the softmax): one local_dot of [g, 1] with [g, -|g_q|²/2].
        query = torch.cat([guidance, torch.ones_like(guidance[:, :1])], dim=1)
        keys = torch.cat([guidance, -0.5 * guidance.pow(2).sum(1, keepdim=True)], dim=1)
    # t·<q, k> = <t·q, k>: scaling the query (D channels) instead of the logits (k*k) saves a pass.
    temperature = torch.as_tensor(temperature, device=query.device, dtype=query.dtype)
    logits = local_dot(temperature * query, _pad(keys, k // 2), backend=backend)
    tm = logits.permute(0, 3, 4, 1, 2).reshape(B, k * k, H, W)  # free for the cpp backend
    log_s = spatial_log_kernel(k, sigma, device=tm.device, dtype=tm.dtype)
    # Sharp kernels underflow: most far taps land in the subnormal range (< 1.2e-38 in float32),
    # and every CPU product touching a subnormal is ~10x slower (the fixup's matmuls over these
    # taps took 4x longer at 448²). Taps below sqrt(tiny) (1e-19 in float32) weigh nothing next to
    # the others (sum 1): zero them, so neither they nor their products are subnormal.
    tiny = torch.finfo(tm.dtype).tiny ** 0.5
    needs_grad = torch.is_grad_enabled() and (tm.requires_grad or log_s.requires_grad)
    if (not needs_grad and tm.dtype == torch.float32 and tm.is_contiguous()
            and choose_backend(tm.device, backend) == "cpp"):
        cpu.tap_softmax_(tm, log_s.detach(), tiny)  # inference: one pass instead of five
        w = tm
    else:
        w = torch.softmax(tm + log_s.view(1, k * k, 1, 1), dim=1)
        w = w.masked_fill(w < tiny, 0.0)
    return w.view(B, k, k, H, W).permute(0, 3, 4, 1, 2)


def jbu_kernel_reference(
    guidance: torch.Tensor, temperature: torch.Tensor | float, sigma: torch.Tensor | float, k: int = 7,
    range_kernel: str = "dot",
) -> torch.Tensor:
    """FeatUp's formulation, literally: softmax range kernel x spatial kernel, renormalised.

    Materialises (B, D, k*k, H, W); for tests only. Same contract as :func:`jbu_kernel`.
    """
    _check(guidance, k, temperature, sigma, range_kernel)
    if range_kernel == "distance":  # literally -|g_p - g_q|² / 2 over the unfolded window
        B, D, H, W = guidance.shape
        cols = F.unfold(_pad(guidance, k // 2), k).view(B, D, k * k, H, W)
        logits = -0.5 * (cols - guidance[:, :, None]).pow(2).sum(1).permute(0, 2, 3, 1)
    else:
        logits = local_dot_reference(guidance, _pad(guidance, k // 2))
    B, H, W = logits.shape[:3]
    rng = torch.softmax(torch.as_tensor(temperature) * logits.reshape(B, H, W, k * k), dim=-1)
    spatial = spatial_log_kernel(k, sigma, device=logits.device, dtype=logits.dtype).exp()
    w = rng * spatial
    return (w / w.sum(-1, keepdim=True).clamp_min(1e-7)).view(B, H, W, k, k)
