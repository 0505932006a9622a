"""Gaussian negative log-likelihood with a learned per-pixel scale (FeatUp's reconstruction loss).

``nll = mean_{b,i,j}( ‖Δ[b,:,i,j]‖² / (2 σ²) + log σ )`` with ``Δ = target - pred`` and the squared
norm **summed** over channels (METHOD.md's ``‖Δ‖²_C``). FeatUp's script averages over channels
instead; with a learned σ both have the same minimiser and the same gradient w.r.t. ``pred`` at
the optimal σ (σ² just absorbs the factor C), so only the loss value differs, by ``log√C``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import ShapeError, check_floating, check_same, check_shape


def gaussian_nll(target: torch.Tensor, pred: torch.Tensor,
                 log_sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Mean over pixels of ``‖target - pred‖²_C / (2σ²) + log σ``.

    Args:
        target: ``(B, C, h, w)`` (e.g. ``f(t(x))``).
        pred: ``(B, C, h, w)`` (e.g. ``σ↓(t(F_hr))``).
        log_sigma: ``(B, 1, h, w)`` per-pixel ``log σ``, or a float (``0`` = plain half MSE).

    Returns:
        Scalar. For ``log σ = c`` constant, the optimum is ``σ² = mean ‖Δ‖²_C``.

    Example:
        >>> t, p = torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1)
        >>> gaussian_nll(t, p)  # 0.5 * (1 + 1)
        tensor(1.)
    """
    dims = check_shape(target, ["B", "C", "h", "w"], "target")
    check_shape(pred, ["B", "C", "h", "w"], "pred")
    check_floating(target, "target")
    check_floating(pred, "pred")
    if pred.shape != target.shape:
        raise ShapeError(f"pred must have the shape of target {tuple(target.shape)} "
                         f"(B, C, h, w), got {tuple(pred.shape)}")
    sq = (target - pred).square().sum(1, keepdim=True)  # (B, 1, h, w)
    if not isinstance(log_sigma, torch.Tensor):
        return 0.5 * sq.mean() * math.exp(-2.0 * float(log_sigma)) + float(log_sigma)
    check_shape(log_sigma, ["B", "1", "h", "w"], "log_sigma")
    check_floating(log_sigma, "log_sigma")
    check_same({"target": target, "log_sigma": log_sigma}, "device")
    want = (dims["B"], 1, dims["h"], dims["w"])
    if tuple(log_sigma.shape) != want:
        raise ShapeError(f"log_sigma must have shape {want} (B, 1, h, w), got "
                         f"{tuple(log_sigma.shape)}")
    # exp(-2 log σ) rather than 1/σ²: no division, no log of a tiny σ.
    return (0.5 * sq * torch.exp(-2.0 * log_sigma) + log_sigma).mean()


class ScaleNet(nn.Module):
    """Predicts per-pixel ``log σ`` from the view's low-res features (FeatUp's uncertainty net).

    1x1 conv ``dim -> hidden``, GELU, 3x3 conv ``hidden -> 1``; output softly bounded to
    ``[-bound, bound]`` (``bound * tanh(z / bound)``) so ``exp(-2 log σ)`` cannot overflow on
    outliers. Starts near ``log σ = 0`` (σ = 1).

    Shape:
        - feats: ``(B, dim, h, w)``
        - output: ``(B, 1, h, w)`` log σ

    Example:
        >>> ScaleNet(16)(torch.rand(2, 16, 7, 9)).shape
        torch.Size([2, 1, 7, 9])
    """

    def __init__(self, dim: int, hidden: int = 32, bound: float = 10.0) -> None:
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not bound > 0:
            raise ValueError(f"bound must be > 0, got {bound!r}")
        self.dim, self.bound = dim, float(bound)
        self.net = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(),
                                 nn.Conv2d(hidden, 1, 3, padding=1, padding_mode="replicate"))
        with torch.no_grad():  # small start (σ ≈ 1), but not zero, so every layer gets gradients
            self.net[-1].weight.mul_(0.1)
            self.net[-1].bias.zero_()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        check_shape(feats, ["B", "C", "h", "w"], "feats")
        check_floating(feats, "feats")
        if feats.shape[1] != self.dim:
            raise ShapeError(f"feats must have {self.dim} channels (B, {self.dim}, h, w), got "
                             f"shape {tuple(feats.shape)}")
        z = self.net(feats)
        return self.bound * torch.tanh(z / self.bound)
