"""upfeat: sharp, full-resolution features for any vision backbone.

Implements FeatUp (Fu, Hamilton et al., ICLR 2024) with fast, exact CPU kernels.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("upfeat")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

from . import backbones  # noqa: E402  (after __version__: submodules read it)
from . import ops  # noqa: E402
from ._checks import ShapeError, UpfeatError  # noqa: E402
from .model import UpFeat, create_model, list_pretrained, load  # noqa: E402

__all__ = ["ShapeError", "UpFeat", "UpfeatError", "backbones", "create_model", "list_pretrained", "load", "ops", "__version__"]
