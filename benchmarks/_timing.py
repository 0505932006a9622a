"""Timing helper shared by the benchmark scripts (run as ``python benchmarks/X.py``, so this
folder is on ``sys.path``)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, after one warm-up call (first-call kernel
    builds, allocator, lazy conversions)."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)
