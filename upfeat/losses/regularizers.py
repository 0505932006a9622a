"""Small priors on the high-res features and on the downsampler's kernel."""
from __future__ import annotations

import torch

from .._checks import ShapeError, check_floating, check_shape


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Squared total variation: mean squared vertical + mean squared horizontal difference.

    Args:
        x: ``(B, C, H, W)``.

    Returns:
        Scalar, 0 for a constant map.

    Example:
        >>> tv_loss(torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]))  # rows equal, columns jump by 1
        tensor(1.)
    """
    check_shape(x, ["B", "C", "H", "W"], "x")
    check_floating(x, "x")
    zero = x.sum() * 0  # keeps the graph (and device / dtype) for 1-pixel-wide maps
    dy = (x[:, :, 1:] - x[:, :, :-1]).square().mean() if x.shape[2] > 1 else zero
    dx = (x[..., 1:] - x[..., :-1]).square().mean() if x.shape[3] > 1 else zero
    return dy + dx


def bilateral_smoothness(feats: torch.Tensor, image: torch.Tensor, n_samples: int = 1000,
                         generator: torch.Generator | None = None, alpha: float = 0.1,
                         beta: float = 0.15, gamma: float = 0.005, w1: float = 10.0,
                         w2: float = 3.0) -> torch.Tensor:
    """Sampled dense-CRF prior: nearby pixels of similar colour should have similar features.

    For ``n_samples`` random pixels (shared across the batch; positions ``p`` in ``[0, 1]``,
    colours ``I``), ``mean_{pairs}( k(p, q) ‖f_p - f_q‖² )`` with the CRF kernel
    ``k = w1 exp(-|p-q|²/(2α) - |I_p-I_q|²/(2β)) + w2 exp(-|p-q|²/(2γ))`` (FeatUp's defaults).
    ``‖f_p - f_q‖²`` is computed as ``‖f_p‖² + ‖f_q‖² - 2 f_p·f_q`` so the largest tensor is
    ``(B, n, n)``, never ``(B, C, n, n)``. Use a small weight (~0.001) in the total loss.

    Args:
        feats: ``(B, C, H, W)`` high-res features (projected features are fine).
        image: ``(B, 3, H, W)`` guidance (any channel count) in the same frame (same view) as ``feats``.
        n_samples: pixels sampled per call.
        generator: randomness (on the generator's device); ``None`` = torch's default.

    Returns:
        Scalar, 0 for constant features.
    """
    dims = check_shape(feats, ["B", "C", "H", "W"], "feats")
    check_shape(image, ["B", "D", "H", "W"], "image")
    check_floating(feats, "feats")
    check_floating(image, "image")
    if image.shape[0] != dims["B"] or image.shape[2:] != feats.shape[2:]:
        raise ShapeError(f"image must have shape ({dims['B']}, *, {dims['H']}, {dims['W']}) to "
                         f"match feats {tuple(feats.shape)}, got {tuple(image.shape)}")
    if not (isinstance(n_samples, int) and n_samples >= 2):
        raise ValueError(f"n_samples must be an int >= 2, got {n_samples!r}")
    h, w = dims["H"], dims["W"]
    src = generator.device if generator is not None else feats.device
    idx = torch.randint(0, h * w, (n_samples,), generator=generator, device=src).to(feats.device)
    pos = torch.stack([idx // w / h, idx % w / w], 1).to(feats.dtype)             # (n, 2)
    f = feats.flatten(2)[:, :, idx]                                                 # (B, C, n)
    col = image.flatten(2)[:, :, idx].to(feats.dtype)                               # (B, 3, n)
    d_pos = torch.cdist(pos, pos).square()[None]                                    # (1, n, n)
    d_col = torch.cdist(col.transpose(1, 2), col.transpose(1, 2)).square()         # (B, n, n)
    kern = w1 * torch.exp(-d_pos / (2 * alpha) - d_col / (2 * beta)) + w2 * torch.exp(-d_pos / (2 * gamma))
    sq = f.square().sum(1)                                                          # (B, n)
    d_f = (sq[:, :, None] + sq[:, None, :] - 2 * f.transpose(1, 2) @ f).clamp_min(0)
    return (kern.detach() * d_f).mean()


def kernel_magnitude(kernel: torch.Tensor) -> torch.Tensor:
    """Peakedness of a normalised kernel: ``Σ k²`` over the last two dims, averaged over the rest.

    For a non-negative kernel summing to 1 over ``k x k`` taps this lies in ``[1/k², 1]``: minimal
    for the box, 1 for a single tap; penalising it keeps the downsampler from collapsing to point
    sampling (the role of FeatUp's kernel-entropy term).

    Example:
        >>> kernel_magnitude(torch.full((4, 4), 1 / 16))
        tensor(0.0625)
    """
    if not isinstance(kernel, torch.Tensor) or kernel.ndim < 2:
        raise ShapeError(f"kernel must be a tensor (..., k, k), got "
                         f"{getattr(kernel, 'shape', type(kernel).__name__)}")
    return kernel.square().sum((-2, -1)).mean()
