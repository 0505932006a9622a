"""Run an evaluation over several upsampler specs and write the result files.

:func:`probe_suite` (linear probes) and :func:`cam_suite` (CAM faithfulness) are what the CLI and
``benchmarks/eval_table.py`` call. Both: open the data (images kept in memory after their first
read), build one cached backbone shared by all specs, compute the backbone features of every image
once up front (``warm_up``, timed apart so that row times are the upsamplers' own), evaluate each
spec, and write ``eval_<task>_<data>_<split>.{md,json,png}`` (+ ``..._examples.png`` for probes;
``<task>`` is ``cam`` for CAM faithfulness).
Specs that cannot be built here (no checkpoint, implicit module missing) are skipped with a note
(``skip_unavailable=True``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..viz import fit_pca, pca_rgb
from . import report
from .cache import CachedBackbone, FeatureCache
from .cam import cam_faithfulness, fit_presence, presence_accuracy
from .datasets import PixelDataset, auto_size, open_dataset, subset
from .cv import CV_META, select_weight_decay
from .features import FeatureSource, UpsamplerUnavailable, parse_spec, resolve, split_specs
from .metrics import BOUNDARY_D
from .probe import ProbeConfig, run_probe

Log = Callable[[str], None]
Specs = str | Sequence[str | nn.Module]


def _open(data: str | os.PathLike[str], split: str, size: tuple[int, int] | None,
          task: str | None, kwargs: dict | None, max_train: int | None, max_eval: int | None,
          notes: list[str], log: Log) -> tuple[PixelDataset, PixelDataset]:
    """Train and ``split`` datasets, subsampled and kept in memory once read (cheap: called
    before the backbone is built, so a bad split fails at once). Scoring on images of the train
    split (``split="train"``, DAVIS ``"all"``) gives a warning, logged and kept in ``notes``."""
    train = open_dataset(data, "train", size, task, **(kwargs or {}))
    val = subset(open_dataset(data, split, size, train.task, **(kwargs or {})), max_eval)
    seen = {p[1].resolve() for p in train.pairs}
    if n := sum(p[1].resolve() in seen for p in val.pairs):
        msg = (f"scoring on {split!r}: {n} of its {len(val)} eval images are in the 'train' "
               f"split the probe / classifier is fitted on; scores measure fit, not generalisation")
        log(f"warning: {msg}")
        notes.append(msg)
    return (replace(subset(train, max_train), keep_in_memory=True),
            replace(val, keep_in_memory=True))


def _sized(datasets: tuple[PixelDataset, PixelDataset], size: tuple[int, int] | None,
           stride: int) -> tuple[PixelDataset, PixelDataset]:
    """Both datasets at ``size`` (``None``: :func:`auto_size` of the train set at ``stride``)."""
    size = size or auto_size(datasets[0], stride)
    return replace(datasets[0], size=size), replace(datasets[1], size=size)


def _backbone(backbone: str | nn.Module | CachedBackbone, cache_mb: float,
              cache_dir: str | os.PathLike[str] | None) -> CachedBackbone:
    """A name, a Backbone, or an existing :class:`CachedBackbone` (reused with its cache)."""
    if isinstance(backbone, CachedBackbone):
        return backbone
    if isinstance(backbone, str):
        from .. import backbones
        backbone = backbones.create(backbone)
    return CachedBackbone(backbone, FeatureCache(cache_mb, cache_dir))


def _parse(specs: Specs) -> list[str | nn.Module]:
    """A list of specs, each str one checked for syntax (fails before anything is loaded)."""
    specs = split_specs(specs) if isinstance(specs, str) else list(specs)
    for spec in specs:
        if isinstance(spec, str):
            parse_spec(spec)
    return specs


def _sources(specs: Sequence[str | nn.Module], bb: CachedBackbone, skip_unavailable: bool,
             notes: list[str]) -> list[FeatureSource]:
    """Resolve every spec up front: bad or missing checkpoints fail (or are skipped with a
    note) before any long computation. A ``NAME=CHECKPOINT`` row is labelled ``NAME`` unless
    another row has the same name."""
    names = [parse_spec(s)[0] if isinstance(s, str) else None for s in specs]
    out = []
    for spec, name in zip(specs, names):
        label = name if name is not None and names.count(name) == 1 else None
        try:
            out.append(resolve(spec, bb, label))
        except UpsamplerUnavailable as e:
            if not skip_unavailable:
                raise
            notes.append(f"`{spec}` skipped: {e}")
    if not out:
        raise ValueError("no upsampler left to evaluate: " + "; ".join(notes))
    return out


def warm_up(bb: CachedBackbone, datasets: Sequence[PixelDataset], progress: bool) -> float:
    """Read every image and cache its backbone features; returns the seconds it took."""
    t = time.perf_counter()
    total = sum(len(d) for d in datasets)
    with tqdm(total=total, desc="backbone features", disable=not progress, leave=False,
              unit="img") as bar:
        for ds in datasets:
            for s in ds:
                bb(s.image[None])
                bar.update()
    return time.perf_counter() - t


def _target_rgb(target: torch.Tensor, ds: PixelDataset, vmax: float | None = None) -> torch.Tensor:
    if ds.task == "depth":
        return report.depth_rgb(target, vmax)
    if ds.task == "fgbg":
        return report.fgbg_rgb(target)
    return report.label_rgb(target, ds.ignore_index)


class Examples:
    """Qualitative panels of ``show`` evenly spaced eval images: image and target, and per spec
    the PCA of its features (one basis per image, fitted on the backbone features) and the probe's
    prediction. :meth:`visitor` plugs into :func:`~upfeat.eval.probe.evaluate_probe`, so the
    features are not computed again."""

    def __init__(self, bb: CachedBackbone, val: PixelDataset, show: int) -> None:
        n = len(val)
        self.val = val
        self.index = sorted({round(i * (n - 1) / max(1, show - 1)) for i in range(min(show, n))})
        samples = [val[i] for i in self.index]
        with torch.no_grad():
            self.bases = {i: fit_pca(bb(s.image[None])) for i, s in zip(self.index, samples)}
        self.vmax = (max(float(s.target.max()) for s in samples)
                     if val.task == "depth" and samples else None)
        self.panels = {i: {"image": s.image, "target": _target_rgb(s.target, val, self.vmax),
                           "pca": [], "pred": []} for i, s in zip(self.index, samples)}

    def visitor(self) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
        def visit(i: int, hr: torch.Tensor, pred: torch.Tensor) -> None:
            if i in self.panels:
                self.panels[i]["pca"].append(pca_rgb(hr, self.bases[i])[0])
                self.panels[i]["pred"].append(_target_rgb(pred, self.val, self.vmax))
        return visit


def _name(data: str | os.PathLike[str]) -> str:
    return Path(data).resolve().name


def probe_suite(data: str | os.PathLike[str], upsamplers: Specs, task: str | None = None,
                backbone: str | nn.Module | CachedBackbone = "vits14_focus",
                size: tuple[int, int] | None = None, split: str = "val",
                out: str | os.PathLike[str] | None = None, pixels_per_image: int = 1500,
                seed: int = 0, max_iter: int = 200, weight_decay: float | str | None = None,
                depth_loss: str = "l2", log_depth: bool = False, cache_mb: float = 2048,
                cache_dir: str | os.PathLike[str] | None = None, show: int = 3,
                progress: bool = True, skip_unavailable: bool = True,
                dataset_kwargs: dict | None = None, max_train: int | None = None,
                max_eval: int | None = None, log: Log | None = None) -> dict:
    """Linear-probe every spec on ``data`` (train split -> ``split``); write results to ``out``.

    ``upsamplers``: specs (see :mod:`upfeat.eval.features`), as a list or one comma-separated str.
    ``backbone``: a name, a Backbone, or a :class:`CachedBackbone` to share its feature cache.
    ``size``: evaluation (H, W); ``None``: 224 high, aspect-preserving width (:func:`auto_size`).
    ``max_train`` / ``max_eval``: use that many evenly spaced images (``None``: all).
    ``weight_decay``: a number, ``None`` (the task's default) or ``"cv"``: chosen from
    :data:`~upfeat.eval.cv.WEIGHT_DECAY_GRID` by grouped cross-validation on the train split with
    bilinear features (:func:`~upfeat.eval.cv.select_weight_decay`), then used for every row.
    Other arguments: see :class:`~upfeat.eval.probe.ProbeConfig` and :mod:`upfeat.apps.eval_cli`.

    Returns ``{"rows": [ProbeResult dicts], "notes", "meta", "paths"}``.
    """
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    notes: list[str] = []
    specs = _parse(upsamplers)
    opened = _open(data, split, size, task, dataset_kwargs, max_train, max_eval, notes, log)
    bb = _backbone(backbone, cache_mb, cache_dir)
    sources = _sources(specs, bb, skip_unavailable, notes)
    train, val = _sized(opened, size, bb.stride)
    cv = weight_decay == "cv"
    cfg = ProbeConfig(train.task, pixels_per_image, seed, max_iter, None if cv else weight_decay,
                      depth_loss, log_depth)
    warm = warm_up(bb, [train, val], progress)
    log(f"backbone features of {len(train)} + {len(val)} images at {val.size}: {warm:.0f} s")
    selection = {}
    if cv:
        t = time.perf_counter()
        wd, scores = select_weight_decay(resolve("bilinear", bb), train, cfg, progress=progress)
        cfg = replace(cfg, weight_decay=wd)
        selection = {CV_META: scores,
                     "weight decay CV seconds": round(time.perf_counter() - t, 1)}
        log(f"weight decay {wd:g} by cross-validation on the train split (bilinear features; "
            + ", ".join(f"{w:g}: {100 * v:.2f}" if cfg.task != "depth" else f"{w:g}: {v:.4f}"
                        for w, v in scores.items()) + ")")
    examples = Examples(bb, val, show)
    shown = report.COLUMNS[cfg.task][:1 if cfg.task == "depth" else 2]  # main (+ boundary d=3)
    rows = []
    for src in sources:
        result, _ = run_probe(src, train, val, cfg, src.label, progress, examples.visitor())
        rows.append({**result.to_dict(), "spec": src.spec})
        scores = ", ".join(f"{head} {report.fmt_score(result.metrics.get(k), sc, f)}"
                           for k, head, sc, f in shown)
        log(f"{src.label}: {scores} ({sum(result.seconds.values()):.0f} s)")
    meta = {"title": f"Linear probe ({cfg.task}) on {_name(data)}/{split}, {bb.name}",
            "data": str(data), "backbone": bb.name, "size (H, W)": list(val.size),
            "train images": len(train), "eval images": len(val), "split": split,
            "pixels per image": pixels_per_image, "seed": seed, "L-BFGS max_iter": max_iter,
            "weight decay": cfg.weight_decay, **selection, "torch threads": torch.get_num_threads(),
            "backbone seconds": round(warm, 1),
            "cache": {"hits": bb.cache.hits, "disk hits": bb.cache.disk_hits,
                      "misses": bb.cache.misses}, "seconds": round(time.perf_counter() - t0, 1)}
    if cfg.task == "depth":
        meta.update({"depth loss": depth_loss, "log depth": log_depth})
    else:
        meta["boundary band d (px)"] = list(BOUNDARY_D)
    paths: dict[str, Path] = {}
    if out is not None:
        stem = f"{cfg.task}_{_name(data)}_{split}"  # the split: a train-split run keeps val's files
        paths = report.write_results(out, stem, cfg.task, rows, meta, notes, val.class_names)
        if examples.panels:
            paths["examples"] = report.qualitative_figure(
                Path(out) / f"eval_{stem}_examples.png", list(examples.panels.values()),
                [r["label"] for r in rows])
    return {"rows": rows, "notes": notes, "meta": meta, "paths": paths}


def cam_suite(data: str | os.PathLike[str], upsamplers: Specs,
              backbone: str | nn.Module | CachedBackbone = "vits14_focus",
              size: tuple[int, int] | None = None, split: str = "val",
              out: str | os.PathLike[str] | None = None, max_iter: int = 300,
              weight_decay: float = 1e-2, min_fraction: float = 0.01, max_rate: float = 0.9,
              cache_mb: float = 2048, cache_dir: str | os.PathLike[str] | None = None,
              progress: bool = True, skip_unavailable: bool = True, max_train: int | None = None,
              max_eval: int | None = None, log: Log | None = None) -> dict:
    """CAM faithfulness (A.D. / A.I.) of every spec on a segmentation dataset (CamVid).

    Arguments as in :func:`probe_suite`; see :mod:`upfeat.eval.cam` for the protocol.
    Returns ``{"rows", "notes", "meta", "paths"}``.
    """
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    notes: list[str] = []
    specs = _parse(upsamplers)
    opened = _open(data, split, size, "seg", None, max_train, max_eval, notes, log)
    bb = _backbone(backbone, cache_mb, cache_dir)
    sources = _sources(specs, bb, skip_unavailable, notes)
    train, val = _sized(opened, size, bb.stride)
    warm = warm_up(bb, [train, val], progress)
    clf, info = fit_presence(bb, train, max_iter, weight_decay, min_fraction, max_rate, progress)
    acc = presence_accuracy(clf, bb, val, min_fraction, progress)
    log(f"presence classifier: val accuracy {acc['accuracy']:.3f}, top class present "
        f"{acc['top1_present']:.3f}")
    rows = []
    for src in sources:
        t = time.perf_counter()
        m = cam_faithfulness(clf, bb, src, val, bb.backbone, progress, f"{src.label}: CAM")
        rows.append({"label": src.label, "spec": src.spec, "metrics": m,
                     "seconds": {"cam": time.perf_counter() - t}})
        log(f"{src.label}: A.D. {m['avg_drop']:.2f}  A.I. {m['avg_increase']:.2f}")
    meta = {"title": f"CAM faithfulness on {_name(data)}/{split}, {bb.name}", "data": str(data),
            "backbone": bb.name, "size (H, W)": list(val.size),
            "train images": len(train), "eval images": len(val), "classifier": info,
            "classifier val": acc, "present if fraction >=": min_fraction,
            "candidates: train presence rate <=": max_rate,
            "torch threads": torch.get_num_threads(), "backbone seconds": round(warm, 1),
            "seconds": round(time.perf_counter() - t0, 1)}
    paths: dict[str, Path] = {}
    if out is not None:
        paths = report.write_results(out, f"cam_{_name(data)}_{split}", "cam", rows, meta, notes)
    return {"rows": rows, "notes": notes, "meta": meta, "paths": paths}
