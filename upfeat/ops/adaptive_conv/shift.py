"""Shift-and-accumulate implementations in plain torch: one fused pass per tap.

Any device, any dtype, autograd by torch. Under ``torch.compile`` (Inductor: C++ on CPU, Triton on
CUDA) the k*k taps fuse into one kernel; that is the GPU path. Peak memory is O(output), never
O(k*k*output).
"""
from __future__ import annotations

import functools

import torch


def adaptive_conv_shift(feat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`~upfeat.ops.adaptive_conv.reference.adaptive_conv_reference`.

    Args:
        feat: (B, C, H+k-1, W+k-1).
        weights: (B, H, W, k, k).

    Returns:
        (B, C, H, W).
    """
    _, H, W, k, _ = weights.shape
    out = None
    for u in range(k):
        for v in range(k):
            term = feat[:, :, u : u + H, v : v + W] * weights[:, None, :, :, u, v]
            out = term if out is None else out + term
    return out


def local_dot_shift(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`~upfeat.ops.adaptive_conv.reference.local_dot_reference`.

    Args:
        query: (B, D, H, W).
        keys: (B, D, H+k-1, W+k-1).

    Returns:
        (B, H, W, k, k).
    """
    B, _, H, W = query.shape
    k = keys.shape[-1] - W + 1
    taps = [(query * keys[:, :, u : u + H, v : v + W]).sum(1) for u in range(k) for v in range(k)]
    return torch.stack(taps, dim=-1).view(B, H, W, k, k)


@functools.cache
def compiled(name: str):
    """``torch.compile``'d shift implementation, created on first use (compiling takes ~10-20 s)."""
    fn = {"adaptive_conv": adaptive_conv_shift, "local_dot": local_dot_shift}[name]
    return torch.compile(fn)  # static first, dynamic shapes after a recompile
