"""Input validation helpers with clear, typed errors (in the spirit of kornia's ``KORNIA_CHECK``).

Every public entry point validates its tensors here so a user sees *which* argument is wrong and
how, never a stack trace from deep inside torch.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import torch

from ._errors import ShapeError, UpfeatError  # noqa: F401  (re-exported: the checks raise them)


def check(cond: bool, msg: str, exc: type[Exception] = ValueError) -> None:
    """Raise ``exc(msg)`` unless ``cond`` holds."""
    if not cond:
        raise exc(msg)


def check_tensor(x: object, name: str) -> torch.Tensor:
    """Return ``x`` if it is a tensor, else raise ``TypeError`` naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_shape(x: torch.Tensor, dims: Sequence[str], name: str) -> dict[str, int]:
    """Check ``x.ndim == len(dims)`` and return ``{dim_name: size}``.

    Example:
        >>> check_shape(torch.zeros(2, 3, 4, 5), ["B", "C", "H", "W"], "feat")
        {'B': 2, 'C': 3, 'H': 4, 'W': 5}
    """
    check_tensor(x, name)
    if x.ndim != len(dims):
        raise ShapeError(
            f"{name} must have shape ({', '.join(dims)}) ({len(dims)} dims), "
            f"got {x.ndim} dims with shape {tuple(x.shape)}"
        )
    return dict(zip(dims, (int(s) for s in x.shape)))


def check_floating(x: torch.Tensor, name: str) -> None:
    """Require a floating-point dtype (fp16, bf16, fp32, fp64)."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_same(tensors: dict[str, torch.Tensor], attr: str) -> None:
    """Require every tensor to share ``attr`` ('dtype' or 'device')."""
    values = {name: getattr(t, attr) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        desc = ", ".join(f"{name}.{attr}={v}" for name, v in values.items())
        raise (TypeError if attr == "dtype" else ValueError)(f"{attr} mismatch: {desc}")


def unknown_name(name: object, known: Iterable[str], what: str, hint: str = "") -> Exception:
    """The error for a name missing from a registry: close matches, then ``hint`` (or the list).

    Example:
        >>> unknown_name("bilinar", ["bilinear", "bicubic"], "upsampler")
        ValueError("unknown upsampler 'bilinar'. Did you mean: bilinear? Known: bicubic, bilinear")
    """
    if not isinstance(name, str):
        return TypeError(f"{what} name must be a str, got {type(name).__name__}")
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    did_you_mean = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {what} {name!r}.{did_you_mean} {hint or 'Known: ' + ', '.join(known)}")


def check_image(img: object, name: str = "img") -> dict[str, int]:
    """Validate an RGB image batch ``(B, 3, H, W)``, floating point, values in ``[0, 1]``."""
    dims = check_shape(img, ["B", "C", "H", "W"], name)  # type: ignore[arg-type]
    assert isinstance(img, torch.Tensor)
    if dims["C"] != 3:
        raise ShapeError(f"{name} must be RGB with 3 channels (B, 3, H, W), got {dims['C']} "
                         f"channels in shape {tuple(img.shape)}")
    if img.dtype == torch.uint8:
        raise TypeError(f"{name} has dtype torch.uint8: convert it to float in [0, 1] first, "
                        f"e.g. {name}.float() / 255")
    check_floating(img, name)
    if img.numel() == 0:
        raise ShapeError(f"{name} is empty: shape {tuple(img.shape)}")
    if img.device.type != "meta":
        finite = torch.isfinite(img.detach())
        if not bool(finite.all()):  # NaN would otherwise spread silently over the whole output
            nan = int(torch.isnan(img.detach()).sum())
            raise ValueError(f"{name} has {img.numel() - int(finite.sum())} non-finite values "
                             f"({nan} NaN, {img.numel() - int(finite.sum()) - nan} Inf) of "
                             f"{img.numel()}; replace them first, e.g. torch.nan_to_num({name})")
        # Catch the two usual mistakes (0..255 floats, already-normalised images) without
        # rejecting the small overshoot that bicubic resizing produces.
        lo, hi = float(img.detach().min()), float(img.detach().max())
        if lo < -0.5 or hi > 1.5:
            raise ValueError(f"{name} must hold un-normalised RGB values in [0, 1], got range "
                             f"[{lo:.3g}, {hi:.3g}]; the backbone applies its own mean/std")
    return dims
