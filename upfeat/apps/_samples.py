"""Where the sample photos are by default (``upfeat demo``, ``upfeat serve``): the folder named by
the environment variable ``UPFEAT_SAMPLES``, else ``../shared/data/samples`` from the current
directory (a clone's root, with the shared data beside it). The library never guesses: its
functions take the photos as an argument."""
from __future__ import annotations

import os
from pathlib import Path

SAMPLES_ENV = "UPFEAT_SAMPLES"


def default_samples() -> Path:
    """``$UPFEAT_SAMPLES`` if set, else ``../shared/data/samples`` relative to the current directory."""
    env = os.environ.get(SAMPLES_ENV, "").strip()
    return Path(env) if env else Path.cwd().parent / "shared" / "data" / "samples"


def samples_or_default(given: str | os.PathLike[str] | None, option: str = "--images") -> Path:
    """``given``, else :func:`default_samples`, which must then exist (else one line saying where
    it looked and what to pass)."""
    if given is not None:
        return Path(given)
    path = default_samples()
    if not path.exists():
        raise FileNotFoundError(f"no sample photos at {path} (expected in ../shared/data beside the "
                                f"repository clone, or in ${SAMPLES_ENV}); pass {option} DIR")
    return path
