"""Random channel projections: compare features in a random low-dimensional subspace per step.

With ``P`` of i.i.d. ``N(0, 1/out_dim)`` entries, ``E[P Pᵀ] = I``, hence
``E‖Pᵀ Δ‖² = ‖Δ‖²``: the projected loss is unbiased for the full one (same optimum in
expectation) at ``out_dim / C`` of the cost of everything after the projection.
"""
from __future__ import annotations

import torch

from .._checks import ShapeError, check_floating, check_shape


def random_projection(dim: int, out_dim: int = 30, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """A ``(dim, out_dim)`` Gaussian matrix scaled by ``1/sqrt(out_dim)`` (``E[P Pᵀ] = I_dim``).

    Drawn on ``generator``'s device (so results do not depend on ``device``), then moved.

    Example:
        >>> random_projection(384, 30, torch.Generator().manual_seed(0)).shape
        torch.Size([384, 30])
    """
    for name, v in (("dim", dim), ("out_dim", out_dim)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    dtype = dtype or torch.get_default_dtype()
    src = generator.device if generator is not None else device
    p = torch.randn(dim, out_dim, generator=generator, device=src, dtype=dtype)
    return (p / out_dim**0.5).to(device=device if device is not None else p.device)


def project(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Project channels: ``(B, C, H, W)``, ``(C, D)`` -> ``(B, D, H, W)``.

    Example:
        >>> project(torch.ones(1, 3, 2, 2), torch.ones(3, 1))[0, 0]
        tensor([[3., 3.],
                [3., 3.]])
    """
    check_shape(x, ["B", "C", "H", "W"], "x")
    check_shape(proj, ["C", "D"], "proj")
    check_floating(x, "x")
    if proj.shape[0] != x.shape[1]:
        raise ShapeError(f"proj must have shape ({x.shape[1]}, D) to match x's {x.shape[1]} "
                         f"channels, got {tuple(proj.shape)}")
    return torch.einsum("bchw,cd->bdhw", x, proj.to(x.dtype))
