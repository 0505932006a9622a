"""The learning-rate schedule shared by JBU training and implicit fits."""
from __future__ import annotations

import math


def warmup_cosine(step: int, lr: float, steps: int, warmup: int, min_lr: float,
                  decay: str = "cosine") -> float:
    """Learning rate of 0-based ``step``: linear warm-up over ``warmup`` steps, then (``decay=
    "cosine"``) cosine decay to ``lr * min_lr`` at ``steps - 1``, or (``"constant"``) ``lr``.

    Example:
        >>> warmup_cosine(0, 1.0, 11, 0, 0.1), warmup_cosine(10, 1.0, 11, 0, 0.1)
        (1.0, 0.1)
    """
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if decay == "constant":
        return lr * warm
    t = min(step / max(steps - 1, 1), 1.0)
    return lr * warm * (min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * t)))
