"""Training images, streamed: deterministic per-step batches for any world size and worker count.

The files are listed once (:func:`list_files`, sorted) and the list cached in the run folder, so
a resumed run draws from the same list even if the folder changed since. The batch of a step is a
pure function of ``(files, seed, step, rank)``: which images (an epoch permutation seeded by
``(seed, epoch)``) and where to crop (seeded by ``(seed, step, rank)``); the view jitter and
dropout of the step are seeded the same way (:data:`STEP`). A run resumed at step ``k`` therefore
sees exactly what the uninterrupted run saw from step ``k`` on, with no sampler or worker state to
save, and the number of DataLoader workers does not change the data.

Images are decoded when their step comes (:class:`TrainBatches`, in DataLoader worker processes
with ``workers > 0``): memory holds the file list (a numpy byte-string array, ~100 bytes per file,
shared copy-on-write with forked workers) and the batches in flight, whatever the number of images.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..io import ImageReadError, find_images, load_image

# Independent random streams derived from the run's seed.
PERMUTATION, CROPS, STEP = 0, 1, 2
FILE_LIST = "files.json"  # in the run folder


def derive_seed(seed: int, stream: int, index: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed for ``(seed, stream, index, rank)`` (e.g. ``index`` = step)."""
    state = np.random.SeedSequence([seed, stream, index, rank]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def list_files(paths: Sequence[str | Path], cache: str | Path | None = None,
               write: bool = True, reuse: bool = True) -> list[str]:
    """The image files under ``paths`` (:func:`~upfeat.io.find_images` order).

    With ``cache`` (a JSON file): read from it when ``reuse`` and it was made for the same
    ``paths``, else listed and (``write``) saved there. Raises ``ValueError`` when there are no
    image files.
    """
    roots = [str(p) for p in paths]
    if reuse and cache is not None and Path(cache).is_file():
        try:
            saved = json.loads(Path(cache).read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("roots") == roots and saved.get("files"):
            return saved["files"]
    files = [str(f) for f in find_images(roots)]
    if not files:
        raise ValueError(f"no images found in {roots}")
    if cache is not None and write:
        from ..checkpoint import atomic_write
        atomic_write(cache, lambda tmp: tmp.write_text(json.dumps({"roots": roots,
                                                                    "files": files})))
    return files


def load_resized(path: str | Path, short_side: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 of an image file, shorter side resized to ``short_side`` (bicubic)."""
    img = load_image(path, min_side=short_side)
    w, h = img.size
    s = short_side / min(w, h)
    img = img.resize((max(short_side, round(w * s)), max(short_side, round(h * s))),
                     Image.BICUBIC)
    return np.asarray(img)


class TrainBatches(Dataset):
    """``batches[step]``: this rank's ``(batch_size, 3, crop, crop)`` uint8 crops of ``step``.

    Epochs are permutations of the files seeded by ``(seed, epoch)``; a global batch of
    ``batch_size * world_size`` images is split between ranks (last partial batch dropped; with
    fewer images than a global batch, images repeat). Images are resized to ``short_side`` then
    cropped at random; ``crops`` may list one crop side per backbone (used in turn, by step).
    An unreadable file is replaced by the next readable one in the list, with a warning.
    """

    def __init__(self, files: Sequence[str | Path], short_side: int, batch_size: int, seed: int,
                 crops: int | Sequence[int], rank: int = 0, world_size: int = 1) -> None:
        if not files:
            raise ValueError("no image files to train on")
        # bytes, not Python strings: forked workers would otherwise copy every page they touch
        # (reference counts), growing each worker by the whole list
        self.files = np.array([os.fsencode(str(f)) for f in files])
        self.short_side, self.batch_size, self.seed = short_side, batch_size, seed
        self.crops = [crops] if isinstance(crops, int) else list(crops)
        if max(self.crops) > short_side:
            raise ValueError(f"crop {max(self.crops)} is larger than the resized side {short_side}")
        self.rank, self.world_size = rank, world_size
        self._perm: tuple[int, torch.Tensor] | None = None
        self._warned: set[int] = set()

    @property
    def n_files(self) -> int:
        return len(self.files)

    def indices(self, step: int) -> list[int]:
        """Indices into ``files`` of this rank's images at ``step``."""
        n, b = self.n_files, self.batch_size
        g = b * self.world_size
        epoch, pos = divmod(step, max(n // g, 1))
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, PERMUTATION, epoch))
            self._perm = (epoch, torch.randperm(n, generator=gen))
        perm = self._perm[1]
        return [int(perm[(pos * g + self.rank * b + i) % n]) for i in range(b)]

    def read(self, i: int) -> np.ndarray:
        """File ``i`` resized, or the next readable file after it (``ValueError`` if none)."""
        n = self.n_files
        for k in range(n):
            j = (i + k) % n
            try:
                return load_resized(os.fsdecode(self.files[j]), self.short_side)
            except (ImageReadError, OSError) as e:
                if j not in self._warned:
                    self._warned.add(j)
                    warnings.warn(f"skipping unreadable image: {' '.join(str(e).split())}",
                                  stacklevel=2)
        raise ValueError(f"no readable images among the {n} file(s), e.g. "
                         f"{os.fsdecode(self.files[0])}")

    def __getitem__(self, step: int) -> torch.Tensor:
        crop = self.crops[step % len(self.crops)]
        gen = torch.Generator().manual_seed(derive_seed(self.seed, CROPS, step, self.rank))
        out = []
        for i in self.indices(step):
            img = self.read(i)
            h, w = img.shape[:2]
            top = int(torch.randint(h - crop + 1, (1,), generator=gen))
            left = int(torch.randint(w - crop + 1, (1,), generator=gen))
            out.append(img[top:top + crop, left:left + crop])
        # crop and transpose in numpy: torch copies strided uint8 slices ~50x slower
        return torch.from_numpy(np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)))


def batch_loader(batches: TrainBatches, steps: range, workers: int,
                 pin_memory: bool = False) -> DataLoader:
    """The batches of ``steps`` in order, decoded by ``workers`` processes (0: in this one)."""
    return DataLoader(batches, batch_size=None, sampler=steps, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=2 if workers else None)
