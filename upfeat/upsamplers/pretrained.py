"""The one resolver of upsampler names, and the shipped weights (timm-style ``name:tag``).

A name is a registered upsampler (:func:`list_upsamplers`), optionally with a tag naming shipped
weights: ``jbu_stack:agnostic`` (the backbone-agnostic JBU, one set of weights for every backbone)
or ``jbu_stack:vits14_focus`` (trained on ``vits14_focus`` only). ``jbu`` is short for
``jbu_stack``; a learned upsampler without a tag gets its default tag. The CLI, ``create_model``,
the demos, the evaluation and the implicit fit all resolve names here.

Example:
    >>> resolve_name("bilinear")
    Resolved(name='bilinear', tag=None, file=None)
    >>> r = resolve_name("jbu:vits14_focus")
    >>> r.name, r.tag, r.file.name
    ('jbu_stack', 'vits14_focus', 'vits14_focus_jbu.safetensors')
    >>> list_pretrained()
    ['jbu_stack:agnostic', 'jbu_stack:vits14_focus']
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._checks import unknown_name
from ..checkpoint import CheckpointError, load_checkpoint, load_module_state, subdict
from ._registry import create, list_upsamplers
from .base import Upsampler

__all__ = ["ALIASES", "LEGACY", "PARAMETER_FREE", "Resolved", "WEIGHTS", "check_backbone",
           "for_backbone", "is_name", "list_pretrained", "load_upsampler", "resolve_name",
           "shipped_upsampler", "weights_file"]

# Package data: the shipped weights (safetensors + a JSON sidecar with the same stem).
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
# name -> tag -> file stem in WEIGHTS; the first tag is the default.
SHIPPED = {"jbu_stack": {"agnostic": "jbu", "vits14_focus": "vits14_focus_jbu"}}
ALIASES = {"jbu": "jbu_stack"}
# Older names of shipped weights, still loadable (torch.hub's ``vits14_focus_jbu``).
LEGACY = {"vits14_focus_jbu": "jbu_stack:vits14_focus"}
# Upsamplers without learned weights: built by name, no checkpoint.
PARAMETER_FREE = ("nearest", "bilinear", "bicubic", "upsample_anything")


@dataclass(frozen=True)
class Resolved:
    """What a name means: the registered ``name``, the weights ``tag`` and ``file`` (``None``
    for a parameter-free upsampler)."""

    name: str
    tag: str | None
    file: Path | None


def list_pretrained() -> list[str]:
    """Every ``name:tag`` with shipped weights (whether or not the file is in this install)."""
    return sorted(f"{n}:{t}" for n, tags in SHIPPED.items() for t in tags)


def resolve_name(spec: str) -> Resolved:
    """``"bilinear"``, ``"jbu"``, ``"jbu_stack:vits14_focus"``, ... -> :class:`Resolved`.

    Raises ``ValueError`` (one line) for an unknown name or tag, and for a learned upsampler
    without shipped weights (saying to pass a checkpoint).
    """
    spec = LEGACY.get(spec, spec) if isinstance(spec, str) else spec  # old names keep working
    name, _, tag = spec.partition(":") if isinstance(spec, str) else (spec, "", "")
    name = ALIASES.get(name, name)
    if name not in list_upsamplers():
        raise unknown_name(spec, [*list_upsamplers(), *ALIASES, *list_pretrained()], "upsampler")
    if name in PARAMETER_FREE:
        if tag:
            raise ValueError(f"upsampler {name!r} has no weights, so no tag {tag!r}")
        return Resolved(name, None, None)
    tags = SHIPPED.get(name, {})
    if not tags:
        raise CheckpointError(f"upsampler {name!r} has learned weights and none are shipped: pass a "
                         f"checkpoint (file or run folder of `upfeat train --upsampler {name}`)")
    tag = tag or next(iter(tags))
    if tag not in tags:
        raise unknown_name(tag, tags, f"weights tag of {name}")
    return Resolved(name, tag, WEIGHTS / f"{tags[tag]}.safetensors")


def is_name(spec: object) -> bool:
    """Whether ``spec`` is an upsampler name (with or without tag) rather than a path."""
    if not isinstance(spec, str):
        return False
    base = spec.partition(":")[0]
    return spec in LEGACY or base in ALIASES or base in list_upsamplers()


def weights_file(spec: str | os.PathLike[str]) -> Path:
    """The checkpoint file of shipped weights (``"jbu"``, ``"jbu_stack:vits14_focus"``, a
    :data:`LEGACY` name), or ``spec`` itself as a path (file or run folder).

    Raises :class:`CheckpointError` when the shipped file is not in this install.
    """
    if not is_name(spec):
        return Path(spec)
    r = resolve_name(spec)  # maps LEGACY names too
    if r.file is None:
        raise ValueError(f"upsampler {r.name!r} has no weights to load; build it with "
                         f"upfeat.upsamplers.create({r.name!r}, dim, stride)")
    if not r.file.is_file():
        raise CheckpointError(f"the shipped weights {spec!r} ({r.name}:{r.tag}) are not in this "
                              f"install ({r.file} is missing); train one with `upfeat train` "
                              f"and pass its run folder or model.safetensors")
    return r.file


def load_upsampler(spec: str | os.PathLike[str]) -> tuple[Upsampler, dict]:
    """The trained upsampler (eval mode) and JSON config of shipped weights (a name, see
    :func:`weights_file`) or of a checkpoint file or run folder."""
    path = weights_file(spec)
    tensors, meta = load_checkpoint(path)
    if "upsampler" not in meta or "backbone" not in meta:
        raise CheckpointError(f"{path}: not an upfeat model checkpoint (no upsampler/backbone "
                              f"in its config)")
    try:
        with torch.random.fork_rng(devices=[]):  # loading never moves the caller's RNG
            up = create(**meta["upsampler"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build its upsampler {meta['upsampler']}: {e}") from None
    load_module_state(up, subdict(tensors, "upsampler"), "upsampler", path)
    return up.eval(), meta


def check_backbone(meta: dict, backbone: nn.Module, source: object) -> None:
    """Raise :class:`CheckpointError` unless ``backbone`` has the checkpoint's dim and stride."""
    want = meta["backbone"]
    got = getattr(getattr(backbone, "cfg", None), "name", type(backbone).__name__)
    if (backbone.dim, backbone.stride) != (want["dim"], want["stride"]):
        raise CheckpointError(
            f"{source} was trained for backbone {want['name']!r} (dim {want['dim']}, stride "
            f"{want['stride']}), but backbone {got!r} has dim {backbone.dim}, stride "
            f"{backbone.stride}; train an upsampler for it: upfeat train --backbone {got} ...")
    if got != want["name"]:
        warnings.warn(f"{source} was trained on {want['name']!r} features, used with {got!r} "
                      f"(same dim and stride)", stacklevel=3)


def for_backbone(up: Upsampler, meta: dict, backbone: nn.Module, source: object) -> Upsampler:
    """``up`` (loaded with ``meta``) made ready for ``backbone``: a backbone-agnostic upsampler is
    re-shaped to its dim and stride, any other one must match them (:func:`check_backbone`)."""
    if getattr(up, "agnostic", False):  # kernels from the image only: any dim and stride
        return up.for_backbone(backbone.dim, backbone.stride).eval()
    check_backbone(meta, backbone, source)
    return up


def shipped_upsampler(spec: str, backbone: nn.Module) -> Upsampler:
    """The shipped weights ``spec`` names (e.g. ``"jbu"``), made ready for ``backbone``.

    Raises :class:`CheckpointError` (one line) when that file is not in this install.
    """
    up, meta = load_upsampler(spec)
    return for_backbone(up, meta, backbone, spec)
