"""``A_h @ x @ A_w^T`` for banded matrices: separable resizes (bicubic + padding) at band cost."""
from __future__ import annotations

import torch

from .._checks import ShapeError, check_floating
from .adaptive_conv import can_run, cpu


def band_matmul(x: torch.Tensor, ah: torch.Tensor, aw: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
    """``out[b, c] = ah @ x[b, c] @ aw.T``, exact to rounding; differentiable in ``x``.

    The C++ backend (CPU, float32/64) touches only each row's run of non-zeros (4 taps for
    bicubic instead of ``h`` and ``w`` multiply-adds per output for dense matmuls); elsewhere, or
    with ``backend="matmul"``, two dense matmuls. ``ah`` and ``aw`` get no gradient.

    Args:
        x: (B, C, h, w).  ah: (Ho, h).  aw: (Wo, w), same dtype and device as ``x``.
        backend: ``None`` (fastest available), ``"cpp"`` or ``"matmul"``.

    Returns:
        (B, C, Ho, Wo).

    Example:
        >>> ah = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
        >>> band_matmul(torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]]), ah, ah)[0, 0]
        tensor([[0., 1., 2.],
                [2., 3., 4.],
                [4., 5., 6.]])
    """
    check_floating(x, "x")
    if x.ndim != 4 or ah.ndim != 2 or aw.ndim != 2 or ah.shape[1] != x.shape[2] \
            or aw.shape[1] != x.shape[3]:
        raise ShapeError(f"band_matmul needs x (B, C, h, w), ah (Ho, h), aw (Wo, w); got "
                         f"{tuple(x.shape)}, {tuple(ah.shape)}, {tuple(aw.shape)}")
    if backend not in (None, "cpp", "matmul"):
        raise ValueError(f"backend must be None, 'cpp' or 'matmul', got {backend!r}")
    ah, aw = ah.to(x), aw.to(x)
    cpp_ok = x.dtype in (torch.float32, torch.float64) and can_run("cpp", x.device)
    if backend == "cpp" and not cpp_ok:
        raise ValueError("backend 'cpp' needs float32/float64 CPU tensors and the C++ kernel")
    if backend != "matmul" and cpp_ok:
        return cpu.Band.apply(x.contiguous(), ah.detach().contiguous(), aw.detach().contiguous())
    (h, w), (Ho, Wo) = x.shape[-2:], (ah.shape[0], aw.shape[0])
    if h * w * Wo + Ho * h * Wo <= Ho * h * w + Ho * w * Wo:  # cheaper multiplication order
        return ah @ (x @ aw.T)
    return (ah @ x) @ aw.T
