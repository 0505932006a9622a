"""upfeat: sharp, full-resolution features for any vision backbone.

Implements FeatUp (Fu, Hamilton et al., ICLR 2024) with fast, exact CPU kernels.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("upfeat")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

from ._errors import ShapeError, UpfeatError  # noqa: E402  (no torch: `upfeat --help` stays fast)

# The rest on first use (PEP 562): `import upfeat.upsamplers` must not pull in every backbone.
_LAZY = {"UpFeat": "model", "create_model": "model", "list_pretrained": "model", "load": "model",
         "backbones": None, "ops": None}


def __getattr__(name: str):
    import importlib
    if name not in _LAZY:
        raise AttributeError(f"module 'upfeat' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


__all__ = ["ShapeError", "UpFeat", "UpfeatError", "backbones", "create_model", "list_pretrained", "load", "ops", "__version__"]
