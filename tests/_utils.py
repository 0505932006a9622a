"""Test helpers shared by several test files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and backward) inside the context."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def save_untrained_model(path, range_dim: int = 8, **kwargs):
    """Write an upfeat model checkpoint for ``vits14_focus`` + an untrained, randomly perturbed
    JBU stack (what ``upfeat train`` exports, without the training); returns the path.
    ``kwargs`` go to the stack (``residual=False, steps=5``: a backbone-agnostic one)."""
    from upfeat.checkpoint import save_checkpoint
    from upfeat import upsamplers

    gen = torch.Generator().manual_seed(0)
    up = upsamplers.create("jbu_stack", dim=384, stride=14, range_dim=range_dim, **kwargs)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in up.state_dict().items()}
    return save_checkpoint(path, {f"upsampler.{k}": v for k, v in state.items()},
                           {"upsampler": up.config(),
                            "backbone": {"name": "vits14_focus", "dim": 384, "stride": 14}},
                           sidecar=True)


def skip_without_focus() -> None:
    """``pytest.skip`` unless the offline ViT-S/14 weights are cached or convertible."""
    import pytest

    from upfeat import backbones
    from upfeat.backbones import focus

    try:
        focus.find_onnx()
    except ImportError:
        if not (backbones.cache_dir() / focus.CACHE_FILE).is_file():
            pytest.skip(f"vits14_focus weights unavailable: {focus.INSTALL}")


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
