"""Multi-view training (FeatUp) on Lightning Fabric: config, data, objective, loop, checkpoints.

:class:`TrainConfig` is imported eagerly (plain dataclass: the CLI builds its options from it);
``fit`` and ``MultiViewObjective`` on first use (PEP 562), so that reading the config does not
import torch or Lightning.
"""
from .config import TrainConfig

_LAZY = {"fit": "engine", "MultiViewObjective": "objective"}


def __getattr__(name: str):
    import importlib
    if name not in _LAZY:
        raise AttributeError(f"module 'upfeat.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["MultiViewObjective", "TrainConfig", "fit"]
