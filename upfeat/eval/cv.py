"""The probe's weight decay chosen by grouped cross-validation on the train split.

One fixed weight decay per task does not suit every backbone: the fg/bg default (0.1) was chosen
on a ViT-S/14's bilinear features, and on a CNN's 1280 ImageNet-class channels it makes the DAVIS
probe predict ~2 % foreground where 6 % is true. :func:`select_weight_decay` picks it per backbone
and task without looking at the eval split: the train images are split into folds of whole
*groups* (video sequences: frames of one sequence are near-duplicates, so a random split would
reward overfitting), a probe is fitted on all folds but one for every candidate, and the pooled
out-of-fold score decides. The caller uses one feature source for this (``benchmarks/eval_table``
and ``upfeat eval probe --weight-decay cv`` use bilinear) and then the same value for every row,
so rows stay comparable.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .datasets import PixelDataset
from .metrics import DepthMeter, SegMeter
from .probe import Features, ProbeConfig, _sample_pixels, fit_probe

__all__ = ["CV_META", "WEIGHT_DECAY_GRID", "cv_folds", "group_of", "parse_weight_decay",
           "select_weight_decay"]

WEIGHT_DECAY_GRID = (1e-4, 1e-3, 1e-2, 0.1)
SCORE = {"seg": "miou", "fgbg": "fg_iou", "depth": "rmse"}  # rmse: lower is better
CV_META = "weight decay CV (bilinear, train split)"  # result meta key: {candidate: CV score}


def parse_weight_decay(text: str | None) -> float | str | None:
    """A ``--weight-decay`` value: ``None`` (the task's default), ``"cv"`` or a number >= 0.

    Example:
        >>> parse_weight_decay("cv"), parse_weight_decay("1e-3"), parse_weight_decay(None)
        ('cv', 0.001, None)
    """
    if text is None or text == "cv":
        return text
    try:
        wd = float(text)
    except ValueError:
        wd = float("nan")
    if not wd >= 0:
        raise ValueError(f"--weight-decay must be a number >= 0 or 'cv', got {text!r}")
    return wd


def group_of(name: str) -> str:
    """The group of an item name: its folder (``"cows/00012"`` -> ``"cows"``, a DAVIS sequence)
    or, without one, the part before the first ``_`` (CamVid ``"0016E5_07959"`` -> ``"0016E5"``).

    Example:
        >>> group_of("cows/00012"), group_of("0016E5_07959"), group_of("img7")
        ('cows', '0016E5', 'img7')
    """
    return name.split("/", 1)[0] if "/" in name else name.split("_", 1)[0]


def cv_folds(names: Sequence[str], k: int = 3) -> torch.Tensor:
    """Fold id (0 .. k'-1, k' <= k) of each item: contiguous runs of whole groups.

    With at most ``k`` groups each group is a fold; with more, groups (in order of first
    appearance) are cut into ``k`` runs of about equal item counts. With a single group, every
    item is its own group (contiguous blocks of the sorted names). Empty folds are dropped.

    Example:
        >>> cv_folds(["a/1", "a/2", "b/1", "c/1", "c/2", "d/1"], k=2).tolist()
        [0, 0, 0, 1, 1, 1]
        >>> cv_folds(["x0", "x1", "x2", "x3"], k=2).tolist()
        [0, 0, 1, 1]
    """
    if k < 2:
        raise ValueError(f"cross-validation needs k >= 2 folds, got {k}")
    groups = [group_of(n) for n in names]
    if len(set(groups)) < 2:
        groups = list(names)
    order = list(dict.fromkeys(groups))
    if len(order) < 2:
        raise ValueError(f"cross-validation needs at least 2 train images, got {len(names)}")
    sizes = {g: groups.count(g) for g in order}
    fold_of, before = {}, 0
    for i, g in enumerate(order):
        # the group's midpoint decides its run; with <= k groups, one group per fold
        fold_of[g] = i if len(order) <= k else min(k - 1, int(k * (before + sizes[g] / 2) / len(names)))
        before += sizes[g]
    ids = sorted(set(fold_of.values()))
    return torch.tensor([ids.index(fold_of[g]) for g in groups])


def select_weight_decay(features: Features, train: PixelDataset, cfg: ProbeConfig,
                        grid: Sequence[float] = WEIGHT_DECAY_GRID, k: int = 3,
                        progress: bool = False) -> tuple[float, dict[float, float]]:
    """The weight decay of ``grid`` with the best pooled out-of-fold score on ``train``.

    The protocol's train pixels (``cfg``: pixels per image, seed, ``max_iter``) are drawn once;
    for each candidate, one probe per fold is fitted on the other folds' pixels and scores the
    held-out ones; the confusion matrices (depth errors) are pooled over folds. Score: mIoU
    (``seg``), fg IoU (``fgbg``), RMSE (``depth``, lower is better). Ties go to the earlier
    candidate.

    Returns ``(best, {candidate: score})``.
    """
    if not grid:
        raise ValueError("weight decay grid is empty")
    x, y, img = _sample_pixels(features, train, cfg, progress, "weight decay CV features")
    fold = cv_folds([p[0] for p in train.pairs], k)[img]
    scores: dict[float, float] = {}
    for wd in grid:
        c = replace(cfg, weight_decay=float(wd))
        meter = (DepthMeter() if cfg.task == "depth"
                 else SegMeter(train.num_classes, train.ignore_index, cfg.task == "fgbg"))
        for f in fold.unique().tolist():
            held = fold == f
            probe, _ = fit_probe(x[~held], y[~held], c, train.num_classes)  # a copy: fit_probe
            pred = probe.predict(x[held].T[None, :, :, None])[0, :, 0]      # standardises in place
            meter.update(pred, y[held])
        scores[float(wd)] = meter.compute()[SCORE[cfg.task]]
    pick = min if cfg.task == "depth" else max
    best = pick(scores, key=lambda w: scores[w])
    return best, scores
