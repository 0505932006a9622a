"""Reference implementations: short, obviously right, slow (they materialise (B,C,k*k,H,W)).

Kept as the oracle for tests and as the baseline row of the benchmark. Autograd is plain torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def adaptive_conv_reference(feat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[b,c,i,j] = sum_{u,v} feat[b,c,i+u,j+v] * weights[b,i,j,u,v]`` via unfold + einsum.

    Args:
        feat: (B, C, H+k-1, W+k-1).
        weights: (B, H, W, k, k).

    Returns:
        (B, C, H, W).
    """
    B, C = feat.shape[:2]
    _, H, W, k, _ = weights.shape
    cols = F.unfold(feat, k).view(B, C, k * k, H, W)  # tap index t = u*k + v
    return torch.einsum("bcthw,bhwt->bchw", cols, weights.reshape(B, H, W, k * k))


def local_dot_reference(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``out[b,i,j,u,v] = sum_d query[b,d,i,j] * keys[b,d,i+u,j+v]`` via unfold + einsum.

    Args:
        query: (B, D, H, W).
        keys: (B, D, H+k-1, W+k-1).

    Returns:
        (B, H, W, k, k).
    """
    B, D, H, W = query.shape
    k = keys.shape[-1] - W + 1
    cols = F.unfold(keys, k).view(B, D, k * k, H, W)
    return torch.einsum("bdthw,bdhw->bhwt", cols, query).reshape(B, H, W, k, k)
