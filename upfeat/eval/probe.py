"""Linear probes on frozen full-resolution features: a 1x1 conv (per-pixel linear map + bias).

Protocol (identical for every upsampler, so result rows are comparable):

1. Train pixels: a generator seeded with ``seed`` draws, for each train image in order,
   ``pixels_per_image`` distinct random *valid* pixels (non-void label / depth > 0; all of them if
   fewer). The draw depends only on the targets, so every upsampler is trained on the same pixels.
   Their full-resolution features ``(N, C)`` are gathered image by image.
2. Features are standardised with the mean / std of those train pixels (folded into the conv).
3. Fit: full-batch L-BFGS (strong Wolfe, ``max_iter`` iterations) from zero weights, with
   cross-entropy (``seg``, ``fgbg``) or, for ``depth``, an L2 (or smooth-L1, Huber δ=0.01 on
   standardised targets) loss on depth or log-depth, plus ``weight_decay / 2 * ||W||²`` (not on
   the bias). Defaults, chosen once on bilinear features (1500 px x 120 CamVid / 48 DAVIS train
   images, scored on val pixels) and then fixed for every upsampler:

   - ``max_iter`` 200: CamVid mIoU 50.84 / 50.76 / 50.82 after 150 / 200 / 300 iterations.
   - ``weight_decay`` per task (:data:`WEIGHT_DECAY`): ``seg`` 1e-4 (CamVid mIoU 50.8 / 48.8 /
     45.3 at 1e-4 / 1e-3 / 1e-2, the last after 100 iterations: many classes, some rare);
     ``fgbg`` 0.1 (DAVIS fg IoU 44.8 / 51.1 / 57.2 / 58.6 at 1e-4 / 1e-3 / 1e-2 / 0.1: train and
     val are different videos, and a weak penalty overfits the train sequences); ``depth`` 1e-4.
4. Evaluation: every val pixel, image by image (full-res features of one image at a time), into
   the metrics of :mod:`upfeat.eval.metrics`; seg / fg-bg also over the boundary bands of
   :data:`~upfeat.eval.metrics.BOUNDARY_D` (d = 3, 8 px: ``miou_d3``, ``fg_iou_d8``, ...).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import ShapeError
from .datasets import TASKS, PixelDataset
from .linear import lbfgs_linear
from .metrics import BOUNDARY_D, DepthMeter, SegMeter

__all__ = ["WEIGHT_DECAY", "Features", "LinearProbe", "ProbeConfig", "ProbeResult", "Visit",
           "evaluate_probe", "fit_probe", "run_probe", "sample_pixels", "valid_mask"]

Features = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) -> (B, C, H, W)
WEIGHT_DECAY = {"seg": 1e-4, "fgbg": 0.1, "depth": 1e-4}  # default per task (module docstring)


@dataclass(frozen=True)
class ProbeConfig:
    """Probe protocol settings (see the module docstring)."""

    task: str = "seg"
    pixels_per_image: int = 1500
    seed: int = 0
    max_iter: int = 200
    weight_decay: float | None = None  # None: WEIGHT_DECAY[task]
    depth_loss: str = "l2"
    log_depth: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", WEIGHT_DECAY[self.task])
        for key in ("pixels_per_image", "max_iter"):
            v = getattr(self, key)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"{key} must be a positive int, got {v!r}")
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not wd >= 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {wd!r}")
        if self.depth_loss not in ("l2", "l1"):
            raise ValueError(f"depth_loss must be 'l2' or 'l1', got {self.depth_loss!r}")


class LinearProbe(nn.Module):
    """1x1 conv with the train standardisation folded in: (B, C, H, W) -> (B, K, H, W).

    ``predict`` gives (B, H, W): argmax class ids, or depth in metres (``K = 1``; ``exp`` of the
    output when trained on log-depth).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, task: str,
                 log_depth: bool = False) -> None:
        super().__init__()
        self.task, self.log_depth = task, log_depth
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1)
        with torch.no_grad():
            self.conv.weight.copy_(weight[:, :, None, None])
            self.conv.bias.copy_(bias)
        self.requires_grad_(False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim != 4 or feats.shape[1] != self.conv.in_channels:
            raise ShapeError(f"probe expects feats (B, {self.conv.in_channels}, H, W), got "
                             f"{tuple(feats.shape)}")
        return self.conv(feats.to(self.conv.weight.dtype))

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        out = self(feats)
        if self.task == "depth":
            return out[:, 0].exp() if self.log_depth else out[:, 0]
        return out.argmax(1)


def valid_mask(target: torch.Tensor, task: str, ignore_index: int | None) -> torch.Tensor:
    """Pixels that count: non-void labels, or finite depth > 0."""
    if task == "depth":
        return (target > 0) & torch.isfinite(target)
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _bar(items: Iterable, progress: bool, desc: str, total: int) -> Iterable:
    return tqdm(items, desc=desc, total=total, disable=not progress, leave=False, unit="img")


def sample_pixels(features: Features, dataset: PixelDataset, cfg: ProbeConfig,
                  progress: bool = False,
                  desc: str = "train features") -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, C)`` float32 and targets ``(N,)`` of the protocol's train pixels.

    ``x`` is allocated once for ``len(dataset) * pixels_per_image`` rows (no concatenation copy)
    and trimmed to the pixels actually drawn.
    """
    x, y, _ = _sample_pixels(features, dataset, cfg, progress, desc)
    return x, y


def _sample_pixels(features: Features, dataset: PixelDataset, cfg: ProbeConfig, progress: bool,
                   desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample_pixels` plus the ``(N,)`` index of each pixel's image in ``dataset``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x: torch.Tensor | None = None
    ys, n = [], 0
    imgs = []
    for i, s in enumerate(_bar(dataset, progress, desc, len(dataset))):
        idx = valid_mask(s.target, cfg.task, dataset.ignore_index).reshape(-1).nonzero()[:, 0]
        idx = idx[torch.randperm(idx.numel(), generator=gen)[:cfg.pixels_per_image]]
        if idx.numel() == 0:
            continue
        hr = features(s.image[None])
        H, W = s.target.shape
        if hr.ndim != 4 or hr.shape[0] != 1 or tuple(hr.shape[-2:]) != (H, W):
            raise ShapeError(f"features of {s.name} have shape {tuple(hr.shape)}, expected "
                             f"(1, C, {H}, {W}) (the target's size)")
        if x is None:
            x = torch.empty(len(dataset) * cfg.pixels_per_image, hr.shape[1])
        x[n:n + idx.numel()] = hr[0][:, idx // W, idx % W].T
        ys.append(s.target.reshape(-1)[idx])
        imgs.append(torch.full((idx.numel(),), i))
        n += idx.numel()
    if x is None:
        raise ValueError(f"no valid train pixels in {dataset.name or 'the train set'} "
                         f"({len(dataset)} images)")
    return x[:n], torch.cat(ys), torch.cat(imgs)


def fit_probe(x: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig,
              num_classes: int | None = None) -> tuple[LinearProbe, dict]:
    """Fit the probe on ``x`` (N, C) (standardised **in place**) and ``y`` (N,).

    Returns the probe (acting on raw features) and ``{"train_pixels", "iterations", "evals",
    "loss"}``.
    """
    if x.ndim != 2 or y.shape != x.shape[:1]:
        raise ShapeError(f"x must be (N, C) and y (N,), got {tuple(x.shape)}, {tuple(y.shape)}")
    std, mean = torch.std_mean(x, 0)
    std = std.clamp_min(1e-6)
    x.sub_(mean).div_(std)
    if cfg.task == "depth":
        t = y.float().log() if cfg.log_depth else y.float()
        t_sd, t_mean = torch.std_mean(t)
        t_sd = t_sd.clamp_min(1e-6)
        w, b, info = lbfgs_linear(x, (t - t_mean) / t_sd, cfg.depth_loss, torch.zeros(1),
                                  cfg.max_iter, cfg.weight_decay)
    else:
        if num_classes is None:
            raise ValueError("num_classes is required for a classification probe")
        y = y.long()
        prior = torch.bincount(y, minlength=num_classes).float().div_(len(y)).clamp_min(1e-6)
        w, b, info = lbfgs_linear(x, y, "ce", prior.log(), cfg.max_iter, cfg.weight_decay)
    # Fold the standardisation (and the target scaling) into the conv.
    w = w / std
    b = b - w @ mean
    if cfg.task == "depth":
        w, b = w * t_sd, b * t_sd + t_mean
    probe = LinearProbe(w, b, cfg.task, cfg.log_depth and cfg.task == "depth")
    return probe, {"train_pixels": int(x.shape[0]), **info}


Visit = Callable[[int, torch.Tensor, torch.Tensor], None]  # (index, feats (1,C,H,W), pred (H,W))


@torch.no_grad()
def evaluate_probe(probe: LinearProbe, features: Features, dataset: PixelDataset,
                   progress: bool = False, desc: str = "eval", visit: Visit | None = None,
                   bands: tuple[int, ...] = BOUNDARY_D) -> dict:
    """Metrics over every valid pixel of ``dataset``, features computed one image at a time.

    ``bands``: boundary distances d of the seg / fg-bg band scores (``miou_d<d>`` ...).
    ``visit(i, feats, pred)``, if given, sees every image's features and prediction (e.g. to draw
    figures without computing the features again).
    """
    if dataset.task == "depth":
        meter: SegMeter | DepthMeter = DepthMeter()
    else:
        meter = SegMeter(dataset.num_classes, dataset.ignore_index, dataset.task == "fgbg", bands)
    for i, s in enumerate(_bar(dataset, progress, desc, len(dataset))):
        hr = features(s.image[None])
        pred = probe.predict(hr)[0].cpu()
        meter.update(pred, s.target)
        if visit is not None:
            visit(i, hr, pred)
    return meter.compute()


@dataclass
class ProbeResult:
    """One row: ``label``, ``metrics`` (see :mod:`metrics`), ``fit`` info, ``seconds`` per stage."""

    label: str
    task: str
    metrics: dict
    fit: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_probe(features: Features, train: PixelDataset, val: PixelDataset, cfg: ProbeConfig,
              label: str = "", progress: bool = False,
              visit: Visit | None = None) -> tuple[ProbeResult, LinearProbe]:
    """Sample train pixels, fit, evaluate on ``val``: the whole protocol for one feature source.

    ``visit``: see :func:`evaluate_probe`.
    """
    if train.task != cfg.task or val.task != cfg.task:
        raise ValueError(f"probe task {cfg.task!r} but datasets are {train.task!r} / {val.task!r}")
    t0 = time.perf_counter()
    x, y = sample_pixels(features, train, cfg, progress, f"{label}: train features")
    t1 = time.perf_counter()
    probe, info = fit_probe(x, y, cfg, train.num_classes)
    del x, y
    t2 = time.perf_counter()
    metrics = evaluate_probe(probe, features, val, progress, f"{label}: eval", visit)
    t3 = time.perf_counter()
    seconds = {"train_features": t1 - t0, "fit": t2 - t1, "eval": t3 - t2}
    return ProbeResult(label, cfg.task, metrics, info, seconds), probe
