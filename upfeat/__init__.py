"""upfeat: sharp, full-resolution features for any vision backbone.

Implements FeatUp (Fu, Hamilton et al., ICLR 2024) with fast, exact CPU kernels.
"""
from importlib.metadata import PackageNotFoundError, version as _version

from . import backbones
from . import ops

try:
    __version__ = _version("upfeat")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = ["backbones", "ops", "__version__"]
