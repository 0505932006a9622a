"""Custom ops of upfeat, each with a reference implementation and fast backends.

- :func:`adaptive_conv`: per-pixel k x k convolution (the JBU's cost centre).
- :func:`local_dot`: k x k local dot products (the JBU range kernel's logits).
- :func:`jbu_kernel`: the joint-bilateral range x spatial kernel built on :func:`local_dot`.
- :func:`band_matmul`: ``A_h @ x @ A_w^T`` for banded matrices (the JBU's bicubic step).
- :func:`cell_conv`, :func:`cell_dot`, :func:`cell_kernel`: the same from each pixel straight to
  the k x k low-res cells around it (upsampling without an interpolated intermediate).
"""
from .adaptive_conv import BACKENDS, adaptive_conv, can_run, choose_backend, local_dot
from .adaptive_conv.cpu import cached_bytes, empty_cache
from .band_matmul import band_matmul
from .cell_conv import cell_conv, cell_dot, cell_kernel, cell_offsets, cell_valid
from .adaptive_conv.reference import adaptive_conv_reference, local_dot_reference
from .jbu_kernel import jbu_kernel, jbu_kernel_reference, spatial_log_kernel

__all__ = [
    "BACKENDS",
    "adaptive_conv",
    "adaptive_conv_reference",
    "band_matmul",
    "cached_bytes",
    "cell_conv",
    "cell_dot",
    "cell_kernel",
    "cell_offsets",
    "cell_valid",
    "can_run",
    "choose_backend",
    "empty_cache",
    "jbu_kernel",
    "jbu_kernel_reference",
    "local_dot",
    "local_dot_reference",
    "spatial_log_kernel",
]
