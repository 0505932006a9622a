"""The implicit network: Fourier features of ``(x, y, r, g, b)`` with a learned phase, then an MLP.

Pixels are handled as rows ``(N, ...)`` (channels last) rather than ``(1, C, H, W)``: every layer
is then one matrix product over all pixels, the fastest layout on CPU, and point queries and grid
queries run the same code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_INPUTS = 5  # x, y, r, g, b


class FourierEncoding(nn.Module):
    """``(N, 5)`` inputs -> ``(N, 2 * 5 * n_freqs + 3)``: ``sin``, ``cos``, then the raw colour.

    Frequencies ``exp(linspace(log_min, log_max, n_freqs))`` (FeatUp: -2..10, 30 frequencies), the
    same for every input; the phase of each (sin/cos, input, frequency) is learned. Inputs are
    expected roughly in ``[-1, 1]`` (coordinates) and ``[-0.5, 0.5]`` (colours).

    Example:
        >>> FourierEncoding(n_freqs=30)(torch.zeros(7, 5)).shape
        torch.Size([7, 303])
    """

    def __init__(self, n_freqs: int = 30, log_min: float = -2.0, log_max: float = 10.0) -> None:
        super().__init__()
        if not (isinstance(n_freqs, int) and n_freqs >= 1):
            raise ValueError(f"n_freqs must be an int >= 1, got {n_freqs!r}")
        self.n_freqs, self.log_max = n_freqs, float(log_max)
        self.register_buffer("freqs", torch.exp(torch.linspace(log_min, log_max, n_freqs)))
        # FeatUp draws the phases from N(0, 1); any start works since they are learned.
        self.phase = nn.Parameter(torch.randn(2, N_INPUTS, n_freqs))

    @property
    def out_dim(self) -> int:
        return 2 * N_INPUTS * self.n_freqs + 3

    def angles(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 5)`` -> ``(N, 5 * n_freqs)`` phase-free angles (fixed while fitting: cached)."""
        return (x[:, :, None] * self.freqs).flatten(1)

    def forward(self, x: torch.Tensor, angles: torch.Tensor | None = None) -> torch.Tensor:
        a = self.angles(x) if angles is None else angles
        s = torch.sin(a + self.phase[0].flatten())
        c = torch.cos(a + self.phase[1].flatten())
        return torch.cat([s, c, x[:, 2:]], 1)


def _channel_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop whole channels for all pixels at once (FeatUp's ``Dropout2d`` on one image)."""
    if not training or p == 0:
        return x
    keep = F.dropout(x.new_ones(1, x.shape[1]), p, True)
    return x * keep


class ImplicitMLP(nn.Module):
    """FeatUp's implicit network: ``(N, 5)`` pixel inputs -> ``(N, out_dim)`` feature codes.

    ``encoding -> LayerNorm -> drop -> Linear(hidden) -> ReLU -> drop -> LayerNorm ->
    Linear(hidden) -> ReLU -> Linear(out_dim)``; ``drop`` removes whole channels for the whole
    image (training only), as the authors' ``Dropout2d``.

    Example:
        >>> ImplicitMLP(out_dim=16)(torch.zeros(10, 5)).shape
        torch.Size([10, 16])
    """

    def __init__(self, out_dim: int, n_freqs: int = 30, hidden: int = 128,
                 dropout: float = 0.2, log_max: float = 10.0) -> None:
        super().__init__()
        for name, v in (("out_dim", out_dim), ("hidden", hidden)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.encoding = FourierEncoding(n_freqs, log_max=log_max)
        d = self.encoding.out_dim
        self.norm_in, self.fc1 = nn.LayerNorm(d), nn.Linear(d, hidden)
        self.norm_h, self.fc2 = nn.LayerNorm(hidden), nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)
        self.dropout = float(dropout)

    def config(self) -> dict:
        return {"out_dim": self.fc3.out_features, "n_freqs": self.encoding.n_freqs,
                "hidden": self.fc1.out_features, "dropout": self.dropout,
                "log_max": self.encoding.log_max}

    def hidden(self, x: torch.Tensor, angles: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, 5)`` -> ``(N, hidden)``, the input of the last (linear) layer ``fc3``."""
        h = _channel_dropout(self.norm_in(self.encoding(x, angles)), self.dropout, self.training)
        h = _channel_dropout(F.relu(self.fc1(h)), self.dropout, self.training)
        return F.relu(self.fc2(self.norm_h(h)))

    def forward(self, x: torch.Tensor, angles: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc3(self.hidden(x, angles))


def pixel_centres(size: tuple[int, int], image_size: tuple[int, int],
                  device: torch.device | None = None) -> torch.Tensor:
    """``(H'*W', 2)`` continuous ``(x, y)`` of the pixel centres of an ``H' x W'`` grid laid over an
    image of ``image_size`` (row-major; the grid covers the same field of view).

    Example:
        >>> pixel_centres((1, 2), (10, 10))
        tensor([[2.5000, 5.0000],
                [7.5000, 5.0000]])
    """
    (h, w), (H, W) = size, image_size
    ys = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) * (H / h)
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) * (W / w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).float()


def to_normalised(xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates ``(N, 2)`` ``(x, y)`` -> ``[-1, 1]`` (``align_corners=False``: pixel ``i``
    spans ``[i, i + 1)``, so -1 and 1 are the outer edges of the image)."""
    H, W = image_size
    scale = xy.new_tensor([2.0 / W, 2.0 / H])
    return xy * scale - 1.0


def sample_colours(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear colours ``(N, 3)`` of ``image`` ``(1, 3, H, W)`` at normalised points ``(N, 2)``;
    outside the image the border colour is used."""
    g = grid.to(image.dtype).view(1, 1, -1, 2)
    out = F.grid_sample(image, g, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T

