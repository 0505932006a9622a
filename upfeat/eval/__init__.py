"""Evaluation of upsampled features (FeatUp's protocol): linear probes and CAM faithfulness.

Modules (one job each):

- :mod:`~upfeat.eval.datasets`: CamVid / folder (seg, depth) / DAVIS (fg/bg) readers.
- :mod:`~upfeat.eval.metrics`: mIoU, pixel accuracy, fg IoU (also within d px of a boundary),
  depth RMSE / δ<1.25, A.D. / A.I.
- :mod:`~upfeat.eval.cache`: backbone features computed once per image and size (LRU + disk).
- :mod:`~upfeat.eval.features`: upsampler specs (``bilinear``, ``large_image``, ``jbu=CKPT``,
  ``resize_conv=CKPT``, ``implicit`` ...) -> ``image (B, 3, H, W) -> features (B, C, H, W)``.
- :mod:`~upfeat.eval.linear`: full-batch L-BFGS for linear maps on many rows.
- :mod:`~upfeat.eval.probe`: the 1x1-conv linear probe protocol.
- :mod:`~upfeat.eval.cv`: the probe's weight decay by cross-validation over train sequences.
- :mod:`~upfeat.eval.cam`: CAM faithfulness with a class-presence classifier.
- :mod:`~upfeat.eval.report`: Markdown / JSON tables, bar chart, qualitative figure.
- :mod:`~upfeat.eval.suite`: run a list of specs end to end (used by the CLI and benchmarks).
- :mod:`~upfeat.apps.eval_cli`: the ``eval_app`` typer app (``upfeat eval probe|cam``).

Example:
    >>> from upfeat.eval import probe_suite  # doctest: +SKIP
    >>> res = probe_suite("../shared/data/camvid", "nearest,bilinear", out="runs/eval")  # doctest: +SKIP
    >>> [(r["label"], round(r["metrics"]["miou"], 3)) for r in res["rows"]]  # doctest: +SKIP
"""
from __future__ import annotations

from .cache import CachedBackbone, FeatureCache
from .cv import cv_folds, select_weight_decay
from .datasets import PixelDataset, Sample, camvid, davis, folder, open_dataset
from .features import FeatureSource, UpsamplerUnavailable, parse_spec, resolve, split_specs
from .metrics import (DepthMeter, SegMeter, average_drop, average_increase, boundary_band,
                      confusion_matrix, depth_scores, fgbg_scores, seg_scores)
from .probe import LinearProbe, ProbeConfig, ProbeResult, fit_probe, run_probe
from .suite import cam_suite, probe_suite

__all__ = ["CachedBackbone", "DepthMeter", "FeatureCache", "FeatureSource", "LinearProbe",
           "PixelDataset", "ProbeConfig", "ProbeResult", "Sample", "SegMeter",
           "UpsamplerUnavailable", "average_drop", "average_increase", "boundary_band", "cam_suite", "camvid",
           "confusion_matrix", "cv_folds", "davis", "depth_scores", "fgbg_scores", "fit_probe", "folder",
           "open_dataset", "parse_spec", "probe_suite", "resolve", "run_probe", "seg_scores",
           "select_weight_decay", "split_specs"]
