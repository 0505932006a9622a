"""Evaluation datasets: an RGB image and a per-pixel target, both resized to one evaluation size.

Layouts (``ROOT`` is the folder passed as ``--data``):

- **Folder / CamVid** (segmentation): ``ROOT/{split}/images/<name>.<jpg|jpeg|png|bmp|tif|webp>``
  and ``ROOT/{split}/labels/<name>.png``, a single-channel 8- or 16-bit PNG whose value is the
  class id. ``ROOT/classes.json`` (optional) gives ``{"classes": [names], "void_id": id}``; without
  it ``void_id`` defaults to 255 and the number of classes is the largest non-void id found in the
  ``train`` labels + 1. CamVid (``../shared/data/camvid``) is this layout with 11 classes, void 11.
- **Folder, depth** (NYU-v2 style, e.g. the 795 / 654 labelled NYU-v2 train / test frames
  exported as PNGs): ``ROOT/{split}/images/<name>.*`` and ``ROOT/{split}/depth/<name>.png``, a
  single-channel 16-bit PNG; metres = value / ``depth_scale`` (default 1000, i.e. millimetres,
  NYU-v2's usual export; KITTI's is 256); 0 = invalid (not scored, not trained on). Evaluate
  such a ``train`` / ``test`` layout with ``--split test``.
- **DAVIS** (fg/bg): ``ROOT/images/<seq>/<frame>.jpg`` and ``ROOT/masks/<seq>/<frame>.png``
  (non-zero = foreground, so both 0/1 and 0/255 masks work). Split *by sequence*, deterministic:
  sequences sorted by name, even positions (0, 2, 4, ...) are ``train``, odd ones ``val``. For the
  14 sequences in ``../shared/data/davis``: train = blackswan, breakdance, car-roundabout, cows,
  dog, drift-straight, horsejump-high (95 frames); val = bmx-trees, camel, car-shadow,
  dance-twirl, drift-chicane, goat, kite-surf (99 frames). ``split="all"`` takes every sequence.

Each item is a :class:`Sample`: ``image`` (3, H, W) float in [0, 1] (bicubic resize), ``target``
(H, W): long class ids (nearest resize) or float depth in metres (nearest resize, 0 = invalid).
Metrics are computed at this evaluation size.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TASKS = ("seg", "fgbg", "depth")


@dataclass
class Sample:
    """One evaluation item. ``image`` (3, H, W) in [0, 1]; ``target`` (H, W) long or float."""

    image: torch.Tensor
    target: torch.Tensor
    name: str


@dataclass
class PixelDataset(Dataset):
    """Image/target file pairs read on access, resized to ``size`` = (H, W) (``None``: native).

    Attributes:
        task: ``"seg"``, ``"fgbg"`` (2 classes, 1 = foreground) or ``"depth"``.
        pairs: ``(name, image path, target path)`` in a fixed (sorted) order.
        num_classes: classes of a segmentation task (``None`` for depth).
        ignore_index: label value excluded from training and metrics (``None``: none).
        class_names: one name per class.  depth_scale: PNG value per metre (depth only).
        keep_in_memory: keep every item after its first read (an evaluation reads each image
            once per upsampler; CamVid at 224 x 294 is ~1.3 MB per item).
    """

    task: str
    pairs: list[tuple[str, Path, Path]]
    size: tuple[int, int] | None = None
    num_classes: int | None = None
    ignore_index: int | None = None
    class_names: list[str] = field(default_factory=list)
    depth_scale: float = 1000.0
    name: str = ""
    keep_in_memory: bool = False
    _items: dict[int, Sample] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Sample:
        if i in self._items:
            return self._items[i]
        name, img_path, tgt_path = self.pairs[i]
        image, target = read_image(img_path, self.size), self.read_target(tgt_path)
        if image.shape[1:] != target.shape:
            raise ValueError(f"{tgt_path} is {tuple(target.shape)} (H, W) but its image {img_path} "
                             f"is {tuple(image.shape[1:])}; pass a size to resize both")
        sample = Sample(image, target, name)
        if self.keep_in_memory:
            self._items[i] = sample
        return sample

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def read_target(self, path: Path) -> torch.Tensor:
        """(H, W) long labels or float depth (metres) of one target file, validated."""
        arr = _read_single_channel(path)
        if self.size is not None:
            arr = resize_nearest(arr, self.size)
        if self.task == "depth":
            return torch.from_numpy(arr.astype(np.float32) / self.depth_scale)
        if self.task == "fgbg":
            return torch.from_numpy((arr > 0).astype(np.int64))
        lab = torch.from_numpy(arr.astype(np.int64))
        bad = (lab < 0) | (lab >= self.num_classes)
        if self.ignore_index is not None:
            bad &= lab != self.ignore_index
        if bad.any():
            raise ValueError(f"{path}: label value {int(lab[bad][0])} is neither a class id "
                             f"0..{self.num_classes - 1} nor the void id {self.ignore_index}")
        return lab


def read_image(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB image file -> (3, H, W) float32 in [0, 1], bicubic-resized to ``size`` = (H, W)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _read_single_channel(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(f"{path}: expected a single-channel PNG (class ids or 16-bit depth), "
                             f"got PIL mode {im.mode!r}")
        return np.asarray(im).astype(np.int64 if im.mode.startswith("I") else np.uint8)


def resize_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W): each output pixel takes the input pixel under its centre (no blending)."""
    h, w = arr.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]


def _pairs(image_dir: Path, target_dir: Path, prefix: str = "") -> list[tuple[str, Path, Path]]:
    """Match ``image_dir/<name>.<ext>`` with ``target_dir/<name>.png``; name any file left over."""
    for d in (image_dir, target_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} not found (see the layouts in upfeat.eval.datasets)")
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    targets = {p.stem: p for p in sorted(target_dir.iterdir()) if p.suffix.lower() == ".png"}
    if not images:
        raise FileNotFoundError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTS)})")
    if missing := sorted(set(images) - set(targets)):
        raise FileNotFoundError(f"{target_dir / (missing[0] + '.png')} missing for image "
                                f"{images[missing[0]]} ({len(missing)} image(s) without target)")
    if extra := sorted(set(targets) - set(images)):
        raise FileNotFoundError(f"{targets[extra[0]]} has no image {image_dir / extra[0]}.* "
                                f"({len(extra)} target(s) without image)")
    return [(prefix + n, images[n], targets[n]) for n in sorted(images)]


def _check_size(size: object) -> tuple[int, int] | None:
    if size is None:
        return None
    ok = isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    if not ok:
        raise ValueError(f"size must be (height, width) positive ints or None, got {size!r}")
    return int(size[0]), int(size[1])  # type: ignore[index]


def _check_split(root: Path, split: str) -> None:
    """Raise naming ``split`` and the splits ``root`` has if ``root/split/images`` is missing."""
    if (root / split / "images").is_dir():
        return
    splits = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
    if splits:
        raise FileNotFoundError(f"split {split!r} not found in {root}: its splits are "
                                f"{', '.join(splits)}")


def folder(root: str | Path, split: str, size: tuple[int, int] | None = None,
           target: str = "labels", void_id: int | None = None, depth_scale: float = 1000.0,
           num_classes: int | None = None) -> PixelDataset:
    """``ROOT/{split}/images`` + ``ROOT/{split}/{labels|depth}`` (module docstring); CamVid too.

    Args:
        target: ``"labels"`` (class-id PNGs) or ``"depth"`` (16-bit PNGs).
        void_id, num_classes: override ``ROOT/classes.json`` (labels only); without either,
            void is 255 and the class count comes from the train labels.
        depth_scale: PNG value per metre (depth only).
    """
    root, size = Path(root), _check_size(size)
    if target not in ("labels", "depth"):
        raise ValueError(f"target must be 'labels' or 'depth', got {target!r}")
    _check_split(root, split)
    pairs = _pairs(root / split / "images", root / split / target)
    if target == "depth":
        if not depth_scale > 0:
            raise ValueError(f"depth_scale must be > 0, got {depth_scale!r}")
        return PixelDataset("depth", pairs, size, depth_scale=float(depth_scale), name=root.name)
    names: list[str] = []
    meta_path = root / "classes.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        names = list(meta.get("classes", []))
        if void_id is None:
            void_id = meta.get("void_id", meta.get("ignore_index"))
        if num_classes is None:
            num_classes = meta.get("num_classes") or len(names) or None
    void_id = 255 if void_id is None else int(void_id)
    if num_classes is None:  # largest non-void id in the train labels + 1
        train_dir = root / "train" / "labels"
        ids = set().union(*(np.unique(_read_single_channel(p)).tolist()
                            for p in sorted(train_dir.glob("*.png")))) - {void_id}
        if not ids:
            raise ValueError(f"{train_dir}: no labels to infer the number of classes from; "
                             f"pass num_classes or write {meta_path}")
        num_classes = max(ids) + 1
    names = names if len(names) == num_classes else [f"class{i}" for i in range(num_classes)]
    return PixelDataset("seg", pairs, size, num_classes, void_id, names, name=root.name)


def camvid(root: str | Path, split: str = "val", size: tuple[int, int] | None = None) -> PixelDataset:
    """CamVid: the folder layout with ``classes.json`` (11 classes, void id 11)."""
    if not (Path(root) / "classes.json").is_file():
        raise FileNotFoundError(f"{Path(root) / 'classes.json'} not found: is {root} CamVid?")
    return folder(root, split, size)


def davis_split(sequences: list[str], split: str) -> list[str]:
    """Deterministic split by sequence: sorted names, even positions train, odd val."""
    seqs = sorted(sequences)
    if split == "all":
        return seqs
    if split not in ("train", "val"):
        raise ValueError(f"DAVIS split must be 'train', 'val' or 'all', got {split!r}")
    return seqs[0::2] if split == "train" else seqs[1::2]


def davis(root: str | Path, split: str = "val", size: tuple[int, int] | None = None) -> PixelDataset:
    """DAVIS frames with binary masks, split by sequence (see the module docstring)."""
    root, size = Path(root), _check_size(size)
    img_root = root / "images"
    if not img_root.is_dir() or not (root / "masks").is_dir():
        raise FileNotFoundError(f"{root}: expected DAVIS layout images/<seq>/ and masks/<seq>/")
    seqs = davis_split([p.name for p in img_root.iterdir() if p.is_dir()], split)
    if not seqs:
        raise FileNotFoundError(f"{img_root} has no sequence folders for split {split!r}")
    pairs = [pair for s in seqs for pair in _pairs(img_root / s, root / "masks" / s, f"{s}/")]
    return PixelDataset("fgbg", pairs, size, 2, None, ["background", "foreground"], name=root.name)


def subset(dataset: PixelDataset, n: int | None) -> PixelDataset:
    """``n`` evenly spaced items of ``dataset`` (all if ``n`` is ``None`` or >= its length)."""
    if n is None or n >= len(dataset):
        return dataset
    if not (isinstance(n, int) and n > 0):
        raise ValueError(f"number of images must be a positive int, got {n!r}")
    step = len(dataset) / n
    return replace(dataset, pairs=[dataset.pairs[int(i * step)] for i in range(n)])


def auto_size(dataset: PixelDataset, stride: int, height: int = 224) -> tuple[int, int]:
    """``(height, W)``: ``W`` the multiple of ``stride`` closest to the first image's aspect ratio.

    E.g. CamVid 360 x 480 -> (224, 294), DAVIS 480 x 854 -> (224, 392) at stride 14.
    """
    if not dataset.pairs:
        raise ValueError(f"dataset {dataset.name!r} is empty")
    with Image.open(dataset.pairs[0][1]) as im:
        w, h = im.size
    return height, max(1, round(height * w / h / stride)) * stride


def detect_task(root: str | Path, split: str = "train") -> str:
    """``"fgbg"`` (DAVIS layout), ``"seg"`` (labels/) or ``"depth"`` (depth/), from the files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} not found")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "fgbg"
    for sub, task in (("labels", "seg"), ("depth", "depth")):
        if (root / split / sub).is_dir():
            return task
    _check_split(root, split)
    raise FileNotFoundError(f"{root}: unknown layout; expected images/ + masks/ (DAVIS), or "
                            f"{split}/images/ with {split}/labels/ or {split}/depth/")


def open_dataset(root: str | Path, split: str, size: tuple[int, int] | None = None,
                 task: str | None = None, **kwargs) -> PixelDataset:
    """Open ``root`` with the layout found on disk; ``task`` (if given) must match it.

    ``kwargs`` go to :func:`folder` (``void_id``, ``depth_scale``, ``num_classes``).
    """
    found = detect_task(root, "train" if split == "all" else split)
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task is not None and task != found:
        raise ValueError(f"--task {task} does not fit {root}: its layout is a {found!r} dataset")
    if found == "fgbg":
        if kwargs:
            raise ValueError(f"{', '.join(sorted(kwargs))} do not apply to the DAVIS layout of {root}")
        return davis(root, split, size)
    return folder(root, split, size, target="labels" if found == "seg" else "depth", **kwargs)
