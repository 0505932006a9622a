"""The adaptive (per-pixel) convolution and the local dot product, one front door, several backends.

Backends (NATTEN-style: validate, then dispatch on a string):

- ``"cpp"``: C++/OpenMP register-tiled kernels, built on first use (CPU default).
- ``"compiled"``: the shift-and-accumulate loop under ``torch.compile`` (CUDA default; Triton).
- ``"shift"``: the same loop in eager torch (any device; fallback).
- ``"reference"``: unfold + einsum, the slow oracle for tests.

Half and bfloat16 inputs are computed (accumulated) in float32 and cast back.
"""
from __future__ import annotations

import functools
import logging

import torch

from ..._checks import ShapeError, check_floating, check_same, check_shape
from . import cpu
from .reference import adaptive_conv_reference, local_dot_reference
from .shift import adaptive_conv_shift, compiled, local_dot_shift

log = logging.getLogger(__name__)
BACKENDS = ("cpp", "compiled", "shift", "reference")
__all__ = ["BACKENDS", "adaptive_conv", "local_dot", "choose_backend", "can_run"]


def can_run(backend: str, device: torch.device, raise_error: bool = False) -> bool:
    """Whether ``backend`` can run on ``device``; with ``raise_error`` say why not."""
    reason = None
    if backend not in BACKENDS:
        reason = f"unknown backend {backend!r}; choose one of {BACKENDS}"
    elif backend == "cpp" and device.type != "cpu":
        reason = f"backend 'cpp' runs on CPU tensors only, got device {device}"
    elif backend == "cpp" and not _cpp_ok():
        reason = "backend 'cpp' is unavailable: the C++ kernel failed to build (see the warning)"
    if reason and raise_error:
        raise ValueError(reason)
    return reason is None


_CPP_OK: list[bool] = []  # filled on first eager use


def _cpp_ok() -> bool:
    if not _CPP_OK:
        if torch.compiler.is_compiling():  # building is not traceable; the op itself loads it
            return True
        _CPP_OK.append(cpu.is_available())
    return _CPP_OK[0]


def choose_backend(device: torch.device, backend: str | None = None) -> str:
    """Return ``backend`` if it can run on ``device``, or the fastest one that can."""
    if backend is not None:
        can_run(backend, device, raise_error=True)
        return backend
    if device.type == "cpu":
        if can_run("cpp", device):
            return "cpp"
        _warn_fallback()
        return "shift"
    return "compiled" if device.type == "cuda" else "shift"


@functools.cache
def _warn_fallback() -> None:
    log.warning("upfeat: C++ kernel unavailable; using the slower pure-torch 'shift' backend")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_pair(x: torch.Tensor, y: torch.Tensor, xname: str, yname: str) -> None:
    check_floating(x, xname)
    check_floating(y, yname)
    check_same({xname: x, yname: y}, "device")
    check_same({xname: x, yname: y}, "dtype")


def adaptive_conv(feat: torch.Tensor, weights: torch.Tensor, backend: str | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel convolution: ``out[b,c,i,j] = sum_{u,v<k} feat[b,c,i+u,j+v] * weights[b,i,j,u,v]``.

    ``feat`` is already padded (by ``k//2`` on each side for a "same" convolution). Differentiable
    in both inputs (to any order on the ``cpp`` backend).

    Args:
        feat: (B, C, H+k-1, W+k-1) floating tensor, any memory layout.
        weights: (B, H, W, k, k), k odd, same dtype and device as ``feat``.
        backend: one of :data:`BACKENDS`, or None for the fastest available.
        out: optional (B, C, H, W) tensor of the inputs' dtype and device to write the result
            into (e.g. a channel slice of a larger output); no autograd through it. The ``cpp``
            backend writes straight into it when its (C, H, W) blocks are contiguous.

    Returns:
        (B, C, H, W), dtype of the inputs (``out`` if given).

    Example:
        >>> feat = torch.ones(1, 2, 6, 7); w = torch.full((1, 4, 5, 3, 3), 1 / 9)
        >>> adaptive_conv(feat, w, backend="shift").shape
        torch.Size([1, 2, 4, 5])
        >>> big = torch.zeros(1, 5, 4, 5)
        >>> adaptive_conv(feat, w, out=big[:, 1:3]).data_ptr() == big[:, 1].data_ptr(), big.sum().item()
        (True, 40.0)
    """
    f = check_shape(feat, ["B", "C", "H+k-1", "W+k-1"], "feat")
    s = check_shape(weights, ["B", "H", "W", "k", "k"], "weights")
    _check_pair(feat, weights, "feat", "weights")
    B, H, W, k = s["B"], s["H"], s["W"], s["k"]
    if weights.shape[3] != weights.shape[4] or k % 2 == 0:
        raise ShapeError(f"weights must end in (k, k) with k odd, got {tuple(weights.shape[3:])}")
    if f["B"] != B or f["H+k-1"] != H + k - 1 or f["W+k-1"] != W + k - 1:
        raise ShapeError(
            f"feat {tuple(feat.shape)} does not fit weights {tuple(weights.shape)}: expected feat of "
            f"shape ({B}, C, {H + k - 1}, {W + k - 1}) (batch {B}, output {H}x{W} padded by k-1={k - 1})"
        )
    name = choose_backend(feat.device, backend)
    if out is not None:
        _check_out(out, feat, weights, (B, f["C"], H, W))
    dtype = feat.dtype
    feat, weights = feat.to(_compute_dtype(dtype)), weights.to(_compute_dtype(dtype))
    direct = out is not None and name == "cpp" and out.dtype == feat.dtype and _blocks_contiguous(out)
    if out is not None and not direct:
        return out.copy_(adaptive_conv(feat, weights, backend=name))
    if name == "cpp":
        # The kernel reads weights pixel-major (B,H,W,k*k) or tap-major (B,k*k,H,W, what
        # jbu_kernel returns as a permuted view): pass whichever we have, as a free view.
        tap = weights.permute(0, 3, 4, 1, 2).is_contiguous() and not weights.is_contiguous()
        wv = weights.permute(0, 3, 4, 1, 2).reshape(B, k * k, H, W) if tap else weights.reshape(B, H, W, k * k)
        if direct:
            cpu.fwd_into(feat.contiguous(), wv.contiguous(), k, tap, out)
            return out
        out = cpu.Fwd.apply(feat.contiguous(), wv.contiguous(), k, tap)
    elif name == "compiled":
        out = compiled("adaptive_conv")(feat, weights)
    elif name == "shift":
        out = adaptive_conv_shift(feat, weights)
    else:
        out = adaptive_conv_reference(feat, weights)
    return out.to(dtype)


def _blocks_contiguous(x: torch.Tensor) -> bool:
    _, C, H, W = x.shape
    return x.stride(3) == 1 and (H == 1 or x.stride(2) == W) and (C == 1 or x.stride(1) == H * W)


def _check_out(out: torch.Tensor, feat: torch.Tensor, weights: torch.Tensor, shape: tuple) -> None:
    if tuple(out.shape) != shape:
        raise ShapeError(f"out must have shape {shape}, got {tuple(out.shape)}")
    check_same({"feat": feat, "out": out}, "device")
    check_same({"feat": feat, "out": out}, "dtype")
    if torch.is_grad_enabled() and (feat.requires_grad or weights.requires_grad):
        raise RuntimeError("adaptive_conv(out=...) does not support autograd; call it under "
                           "torch.no_grad() or torch.inference_mode(), or without out")


def local_dot(query: torch.Tensor, keys: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Local dot products: ``out[b,i,j,u,v] = sum_d query[b,d,i,j] * keys[b,d,i+u,j+v]``.

    The correlation of each pixel's vector with its k x k neighbourhood (the JBU range kernel's
    logits). It is the weight-gradient of :func:`adaptive_conv`, so it shares its kernels and never
    materialises (B, D, k*k, H, W).

    Args:
        query: (B, D, H, W).
        keys: (B, D, H+k-1, W+k-1), k odd.
        backend: one of :data:`BACKENDS`, or None for the fastest available.

    Returns:
        (B, H, W, k, k); on the ``cpp`` backend a permuted view of a tap-major (B, k, k, H, W) tensor.

    Example:
        >>> local_dot(torch.ones(1, 3, 4, 4), torch.ones(1, 3, 6, 6), backend="shift")[0, 0, 0]
        tensor([[3., 3., 3.],
                [3., 3., 3.],
                [3., 3., 3.]])
    """
    q = check_shape(query, ["B", "D", "H", "W"], "query")
    kk = check_shape(keys, ["B", "D", "H+k-1", "W+k-1"], "keys")
    _check_pair(query, keys, "query", "keys")
    B, D, H, W = q["B"], q["D"], q["H"], q["W"]
    k = kk["W+k-1"] - W + 1
    if kk["B"] != B or kk["D"] != D or k < 1 or k % 2 == 0 or kk["H+k-1"] != H + k - 1:
        raise ShapeError(
            f"keys {tuple(keys.shape)} do not fit query {tuple(query.shape)}: expected "
            f"({B}, {D}, H+k-1, W+k-1) with the same odd k on both axes"
        )
    name = choose_backend(query.device, backend)
    dtype = query.dtype
    query, keys = query.to(_compute_dtype(dtype)), keys.to(_compute_dtype(dtype))
    if name == "cpp":
        tm = cpu.Corr.apply(query.contiguous(), keys.contiguous(), k, True)
        out = tm.view(B, k, k, H, W).permute(0, 3, 4, 1, 2)
    elif name == "compiled":
        out = compiled("local_dot")(query, keys)
    elif name == "shift":
        out = local_dot_shift(query, keys)
    else:
        out = local_dot_reference(query, keys)
    return out.to(dtype)
