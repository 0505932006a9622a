"""Training images: any folders of images, deterministic per-step batches for any world size.

Every random choice of a step (which images, where to crop, which views, dropout) is drawn from a
seed derived from ``(seed, step, rank)``. A run resumed at step ``k`` therefore sees exactly what
the uninterrupted run saw from step ``k`` on, with no sampler or worker state to save.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import ImageReadError, iter_images


# Independent random streams derived from the run's seed.
PERMUTATION, CROPS, STEP = 0, 1, 2


def derive_seed(seed: int, stream: int, index: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed for ``(seed, stream, index, rank)`` (e.g. ``index`` = step)."""
    state = np.random.SeedSequence([seed, stream, index, rank]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


class TrainImages:
    """Images under ``paths`` (recursive), shorter side resized to ``short_side``, kept in memory.

    Unreadable files are skipped with a warning (once, at construction). Memory: 3 bytes per
    pixel after resizing (e.g. 561 images at 224 x 400 = 150 MB).
    """

    def __init__(self, paths: Sequence[str | Path] | str | Path, short_side: int) -> None:
        self.images: list[torch.Tensor] = []
        self.paths: list[Path] = []
        bad = []
        for p, img in iter_images(paths):
            if isinstance(img, ImageReadError):
                bad.append(str(img))
                continue
            w, h = img.size
            s = short_side / min(w, h)
            img = img.resize((max(short_side, round(w * s)), max(short_side, round(h * s))),
                             Image.BICUBIC)
            self.images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
            self.paths.append(Path(p))
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable image(s): " + "; ".join(bad[:3])
                          + (" ..." if len(bad) > 3 else ""), stacklevel=2)
        if not self.images:
            where = [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]
            raise ValueError(f"no readable images found in {where}")

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, step: int, seed: int, batch_size: int, crop: int, rank: int = 0,
              world_size: int = 1) -> torch.Tensor:
        """``(batch_size, 3, crop, crop)`` float in [0, 1] for this rank at ``step``.

        Epochs are permutations of the images seeded by ``(seed, epoch)``; a global batch of
        ``batch_size * world_size`` images is split between ranks (last partial batch dropped;
        with fewer images than a global batch, images repeat).
        """
        n, g = len(self.images), batch_size * world_size
        per_epoch = max(n // g, 1)
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(
            derive_seed(seed, PERMUTATION, epoch)))
        idx = [int(perm[(pos * g + rank * batch_size + i) % n]) for i in range(batch_size)]
        gen = torch.Generator().manual_seed(derive_seed(seed, CROPS, step, rank))
        out = []
        for i in idx:
            img = self.images[i]
            h, w = img.shape[-2:]
            top = int(torch.randint(h - crop + 1, (1,), generator=gen))
            left = int(torch.randint(w - crop + 1, (1,), generator=gen))
            out.append(img[:, top:top + crop, left:left + crop])
        return torch.stack(out).float().div_(255)

