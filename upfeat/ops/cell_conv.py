"""Guided upsampling straight from the low-res grid: every output pixel is a weighted sum of the
k x k feature *cells* around its own cell (Kopf et al.'s joint bilateral upsampling).

With stride ``s`` (output ``(s·h, s·w)`` for features ``(h, w)``), pixel ``(y, x)`` lies in cell
``(y // s, x // s)`` and reads the cells ``(y // s + u - r, x // s + v - r)``, ``r = k // 2``:

    cell_conv:  out[b, c, y, x]    = Σ_{u,v} feats[b, c, y//s + u - r, x//s + v - r] · w[b, y, x, u, v]
    cell_dot:   out[b, y, x, u, v] = Σ_d   query[b, d, y, x] · keys[b, d, y//s + u - r, x//s + v - r]

Cells outside the map read as zeros (:func:`cell_kernel` gives them zero weight). Unlike FeatUp's
layer (bicubic resize, then a k x k filter at the output grid), nothing is interpolated before
the weighting, so a pixel's feature is a convex combination of *whole* cells: across an edge it
can take the cell on its own side instead of a blend of both.

Both ops run on :func:`~upfeat.ops.adaptive_conv` / :func:`~upfeat.ops.local_dot` (all backends,
any order of derivatives) by splitting the output into its ``s x s`` sub-pixel phases: phase
``(a, b)`` (pixels ``(s·i + a, s·j + b)``) is an ordinary ``h x w`` per-pixel convolution of the
padded low-res map. One call per phase row keeps the extra memory at ``1/s`` of the output and
never builds ``(B, C, k², H, W)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import ShapeError, check_floating, check_same, check_shape
from .adaptive_conv import adaptive_conv, local_dot


def _stride(H: int, W: int, h: int, w: int, what: str) -> int:
    s = H // h if h else 0
    if h < 1 or w < 1 or s < 1 or H != s * h or W != s * w:
        raise ShapeError(f"{what}: the high-res grid ({H}, {W}) must be the low-res grid ({h}, {w}) "
                         f"times one integer stride on both axes")
    return s


def _phase_rows(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, ..., s·h, s·w) tap-major grid -> (s, B·s, ..., h, w): phase row a, batch of phases b."""
    B, *mid, H, W = x.shape
    h, w = H // s, W // s
    x = x.reshape(B, -1, h, s, w, s).permute(3, 0, 5, 1, 2, 4)  # (a, B, b, M, h, w)
    return x.reshape(s, B * s, *mid, h, w)


def cell_conv(feats: torch.Tensor, weights: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Per-pixel weighted sum of the k x k low-res cells around each pixel's cell.

    Args:
        feats: (B, C, h, w) low-res features (not padded).
        weights: (B, s·h, s·w, k, k), k odd; tap (u, v) is the cell offset (u - k//2, v - k//2).
        backend: backend of :func:`~upfeat.ops.adaptive_conv`.

    Returns:
        (B, C, s·h, s·w).

    Example:
        >>> f = torch.arange(4.).view(1, 1, 2, 2)
        >>> w = torch.zeros(1, 6, 6, 3, 3); w[..., 1, 1] = 1   # centre tap only: nearest
        >>> cell_conv(f, w, backend="shift")[0, 0, ::3, ::3]
        tensor([[0., 1.],
                [2., 3.]])
    """
    f = check_shape(feats, ["B", "C", "h", "w"], "feats")
    g = check_shape(weights, ["B", "H", "W", "k", "k"], "weights")
    check_floating(feats, "feats")
    check_floating(weights, "weights")
    check_same({"feats": feats, "weights": weights}, "device")
    check_same({"feats": feats, "weights": weights}, "dtype")
    k = g["k"]
    if weights.shape[-1] != k or k % 2 == 0 or f["B"] != g["B"]:
        raise ShapeError(f"weights must be (B={f['B']}, H, W, k, k) with k odd, got {tuple(weights.shape)}")
    s = _stride(g["H"], g["W"], f["h"], f["w"], "cell_conv")
    B, C, h, w, r = f["B"], f["C"], f["h"], f["w"], k // 2
    padded = F.pad(feats, [r, r, r, r])
    # Weights as (B, k², H, W) so one permutation splits both grid axes into phases.
    taps = _phase_rows(weights.permute(0, 3, 4, 1, 2).reshape(B, k * k, g["H"], g["W"]), s)
    # The s phases of one row share one copy of the padded map (1/s of the output's size).
    fa = padded.unsqueeze(1).expand(B, s, C, h + 2 * r, w + 2 * r).reshape(B * s, C, h + 2 * r, w + 2 * r)
    rows = []
    for a in range(s):
        wa = taps[a].view(B * s, k, k, h, w).permute(0, 3, 4, 1, 2)  # tap-major view
        rows.append(adaptive_conv(fa, wa, backend=backend).view(B, s, C, h, w))
    out = torch.stack(rows, 0)  # (a, B, b, C, h, w)
    return out.permute(1, 3, 4, 0, 5, 2).reshape(B, C, s * h, s * w)


def cell_dot(query: torch.Tensor, keys: torch.Tensor, k: int = 3, backend: str | None = None) -> torch.Tensor:
    """Dot products of every high-res query with the k x k low-res keys around its cell.

    Args:
        query: (B, D, s·h, s·w).
        keys: (B, D, h, w) (not padded; outside cells are zeros).
        k: odd window size in cells.
        backend: backend of :func:`~upfeat.ops.local_dot`.

    Returns:
        (B, s·h, s·w, k, k).

    Example:
        >>> cell_dot(torch.ones(1, 2, 4, 4), torch.ones(1, 2, 2, 2), k=3, backend="shift")[0, 0, 0]
        tensor([[0., 0., 0.],
                [0., 2., 2.],
                [0., 2., 2.]])
    """
    q = check_shape(query, ["B", "D", "H", "W"], "query")
    kk = check_shape(keys, ["B", "D", "h", "w"], "keys")
    check_floating(query, "query")
    check_floating(keys, "keys")
    check_same({"query": query, "keys": keys}, "device")
    check_same({"query": query, "keys": keys}, "dtype")
    if k < 1 or k % 2 == 0 or q["B"] != kk["B"] or q["D"] != kk["D"]:
        raise ShapeError(f"query {tuple(query.shape)} and keys {tuple(keys.shape)} must share B and D, "
                         f"and k={k} must be odd")
    s = _stride(q["H"], q["W"], kk["h"], kk["w"], "cell_dot")
    B, D, h, w, r = q["B"], q["D"], kk["h"], kk["w"], k // 2
    padded = F.pad(keys, [r, r, r, r]).unsqueeze(1).expand(B, s * s, D, h + 2 * r, w + 2 * r)
    qp = _phase_rows(query, s).reshape(s * s * B, D, h, w)  # order (a, B, b)
    kp = padded.reshape(B, s, s, D, h + 2 * r, w + 2 * r).transpose(0, 1).reshape(s * s * B, D, h + 2 * r, w + 2 * r)
    out = local_dot(qp, kp, backend=backend).reshape(s, B, s, h, w, k, k)  # (a, B, b, h, w, k, k)
    return out.permute(1, 3, 0, 4, 2, 5, 6).reshape(B, s * h, s * w, k, k)


def cell_offsets(s: int, k: int, device=None, dtype=None) -> torch.Tensor:
    """Offset from each pixel to the centre of each tap's cell, in cell units: (s, s, k, k, 2).

    ``[a, b, u, v] = (u - k//2 - (a + 0.5)/s + 0.5, v - k//2 - (b + 0.5)/s + 0.5)`` as (dy, dx)
    for the pixel at sub-pixel phase (a, b) of its cell.

    Example:
        >>> cell_offsets(2, 1)[..., 0, 0, :]   # the own cell's centre seen from its 4 pixels
        tensor([[[ 0.2500,  0.2500],
                 [ 0.2500, -0.2500]],
        <BLANKLINE>
                [[-0.2500,  0.2500],
                 [-0.2500, -0.2500]]])
    """
    phase = (torch.arange(s, device=device, dtype=dtype or torch.float32) + 0.5) / s - 0.5
    tap = torch.arange(k, device=device, dtype=phase.dtype) - k // 2
    d = tap[None, :] - phase[:, None]  # (s, k)
    dy = d[:, None, :, None].expand(s, s, k, k)
    dx = d[None, :, None, :].expand(s, s, k, k)
    return torch.stack([dy, dx], -1)


def cell_valid(h: int, w: int, s: int, k: int, device=None) -> torch.Tensor:
    """Whether each tap's cell lies inside the (h, w) map: bool (s·h, s·w, k, k).

    Example:
        >>> cell_valid(2, 2, 1, 3)[0, 0].int()
        tensor([[0, 0, 0],
                [0, 1, 1],
                [0, 1, 1]], dtype=torch.int32)
    """
    r = k // 2
    iy = torch.arange(s * h, device=device) // s
    ix = torch.arange(s * w, device=device) // s
    t = torch.arange(k, device=device) - r
    vy = ((iy[:, None] + t) >= 0) & ((iy[:, None] + t) < h)  # (H, k)
    vx = ((ix[:, None] + t) >= 0) & ((ix[:, None] + t) < w)  # (W, k)
    return vy[:, None, :, None] & vx[None, :, None, :]


def cell_kernel(query: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor | float,
                sigma: torch.Tensor | float, k: int = 3, backend: str | None = None) -> torch.Tensor:
    """Joint-bilateral weights from pixels to cells: range kernel x spatial Gaussian, normalised.

    ``w[b,y,x,u,v] ∝ exp(-t·|query[b,:,y,x] - keys[b,:,cell]|²/2 - |offset|²/(2σ²))`` over the k x k
    cells inside the map (outside cells get weight 0), ``offset`` from :func:`cell_offsets` in
    cell units. Computed as one softmax of ``t·(<q, k> - |k|²/2) + log spatial`` (the ``|q|²``
    term is constant over a pixel's window).

    Args:
        query: (B, D, s·h, s·w) per-pixel guidance.  keys: (B, D, h, w) per-cell guidance.
        temperature: positive scalar or (B, 1, s·h, s·w) per-pixel.  sigma: positive scalar (cells).
        k: odd window size in cells.

    Returns:
        (B, s·h, s·w, k, k), summing to 1 over the last two dims.

    Example:
        >>> q = torch.zeros(1, 1, 4, 4); q[..., 2:] = 1; keys = torch.tensor([[[[0., 1.]]]])
        >>> w = cell_kernel(q, keys.expand(1, 1, 2, 2), 100.0, 1.0, backend="shift")
        >>> w[0, 0, 1].sum(0).round(decimals=4)  # pixel (0, 1), left half: takes the left cells
        tensor([0., 1., 0.])
    """
    B, D, H, W = check_shape(query, ["B", "D", "H", "W"], "query").values()
    h, w = keys.shape[-2:]
    s = _stride(H, W, h, w, "cell_kernel")
    qx = torch.cat([query, torch.ones_like(query[:, :1])], 1)
    kx = torch.cat([keys, -0.5 * keys.pow(2).sum(1, keepdim=True)], 1)
    logits = cell_dot(qx, kx, k=k, backend=backend)
    t = torch.as_tensor(temperature, device=query.device, dtype=query.dtype)
    if t.ndim == 4:  # per-pixel temperature (B, 1, H, W)
        t = t.permute(0, 2, 3, 1)[..., None]
    sigma = torch.as_tensor(sigma, device=query.device, dtype=query.dtype)
    off = cell_offsets(s, k, device=query.device, dtype=query.dtype)
    log_s = -off.pow(2).sum(-1) / (2 * sigma**2)  # (s, s, k, k)
    log_s = log_s[None, :, None, :].expand(h, s, w, s, k, k).reshape(H, W, k, k)
    valid = cell_valid(h, w, s, k, device=query.device)
    z = torch.where(valid, t * logits + log_s, torch.finfo(query.dtype).min)
    return torch.softmax(z.reshape(B, H, W, k * k), -1).view(B, H, W, k, k)


def cell_conv_reference(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`cell_conv` literally (unfold the cells, repeat to pixels, sum): tests only."""
    B, C, h, w = feats.shape
    _, H, W, k, _ = weights.shape
    s = H // h
    cols = F.unfold(F.pad(feats, [k // 2] * 4), k).view(B, C * k * k, h, w)
    cols = cols.repeat_interleave(s, 2).repeat_interleave(s, 3).view(B, C, k * k, H, W)
    return torch.einsum("bcthw,bhwt->bchw", cols, weights.reshape(B, H, W, k * k))
