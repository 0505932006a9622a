"""Fitting schedules: the authors' recipe (``reference``) and upfeat's default (``fast``)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..._checks import unknown_name
from ...lr import warmup_cosine

BASES = ("none", "bilinear", "jbu")  # what Schedule.base may name


@dataclass(frozen=True)
class Schedule:
    """How one image is fitted.

    Attributes:
        name: label stored with the result.
        pool: jittered views whose backbone features are computed up front (the backbone cost);
            the identity view is always one of them.
        pca_views: the first ``pca_views`` views of the pool fit the PCA (authors: 50).
        steps: optimiser steps.  views: views per step, drawn from the pool with replacement.
        lr: peak learning rate.  optimizer: ``"nadam"`` or ``"adam"``.
        decay: ``"constant"`` or ``"cosine"`` (to ``lr * min_lr``) after ``warmup`` linear steps.
        proj_dim: compare in a fresh random ``proj_dim``-dim subspace of the PCA codes each step,
            projected *before* warping (``None``: all codes, as the authors).
        tv_weight: total-variation prior on the high-res codes.
        coarse: fraction of the steps (the first ones) run at half resolution: network, warps
            and a downsampler of half the stride on a half-size grid (4x cheaper steps; its
            downsampler then initialises the full-resolution one). Needs an even stride
            (otherwise every step runs at full resolution).
        sigma_warmup: fraction of the steps (the first ones) with a fixed uncertainty σ = 1; the
            learned σ then takes over. Learning σ from the start lets it absorb the large initial
            errors, which slows the fit of the features down (measured: see the README).
        anchor: make the un-jittered view one of every step's views (else it is one of the
            ``pool`` views drawn at random): its features are the ones the image actually has.
        base: start from another upsampler's output and fit the network as a correction to it
            (its last layer starts at zero): ``"none"`` (authors: the network alone),
            ``"bilinear"``, or ``"jbu"`` (the shipped ``<backbone>_jbu`` checkpoint when there is
            one, else bilinear). :func:`fit_implicit` can pass any upsampler instead.
        dropout: channel dropout of the MLP (authors 0.2).
        downsampler: ``"attention"`` (authors) or ``"simple"`` (one learned blur).
        kernel: downsampler window in strides (``round(kernel * s)`` pixels; authors
            29 px at stride 14 and 16).
        max_zoom: jitter zoom range ``[1, max_zoom]``; max_pad: reflection padding as a fraction
            of the shorter image side (authors: 30 px at 224).
        n_freqs, log_max, hidden: frequencies ``exp(linspace(-2, log_max, n_freqs))`` of the
            encoding (authors: 30 up to ``e^10``) and the MLP width.
        bf16: run the backbone views and the MLP's matrix products in bfloat16 (autocast; sums,
            norms and the loss stay float32) where the hardware has fast bfloat16 products
            (:func:`upfeat._device.bf16_fast`), else float32. Backbone features differ by ~0.5 % (relative L2).
    """

    name: str
    pool: int
    pca_views: int
    steps: int
    views: int
    lr: float
    optimizer: str = "nadam"
    decay: str = "constant"
    warmup: int = 0
    min_lr: float = 0.1
    proj_dim: int | None = None
    tv_weight: float = 0.0
    coarse: float = 0.0
    sigma_warmup: float = 0.0
    anchor: bool = False
    base: str = "none"
    dropout: float = 0.2
    downsampler: str = "attention"
    kernel: float = 1.0
    max_zoom: float = 1.8
    max_pad: float = 30 / 224
    n_freqs: int = 30
    log_max: float = 10.0
    hidden: int = 128
    bf16: bool = False

    def __post_init__(self) -> None:
        for key in ("pool", "pca_views", "steps", "views", "n_freqs", "hidden"):
            v = getattr(self, key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"schedule {key} must be an int >= 1, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"schedule lr must be > 0, got {self.lr!r}")
        if self.optimizer not in ("nadam", "adam"):
            raise ValueError(f"schedule optimizer must be 'nadam' or 'adam', got "
                             f"{self.optimizer!r}")
        if self.downsampler not in ("attention", "simple"):
            raise ValueError(f"schedule downsampler must be 'attention' or 'simple', got "
                             f"{self.downsampler!r}")
        if self.base not in BASES:
            raise ValueError(f"schedule base must be 'none', 'bilinear' or 'jbu', got "
                             f"{self.base!r}")
        if self.decay not in ("constant", "cosine"):
            raise ValueError(f"schedule decay must be 'constant' or 'cosine', got {self.decay!r}")
        for key in ("coarse", "sigma_warmup"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"schedule {key} must be in [0, 1], got {getattr(self, key)!r}")
        p = self.proj_dim
        if p is not None and not (isinstance(p, int) and p >= 1):
            raise ValueError(f"schedule proj_dim must be an int >= 1 or None, got {p!r}")

    def replace(self, **changes) -> Schedule:
        """A copy with some fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``."""
        return warmup_cosine(step, self.lr, self.steps, self.warmup, self.min_lr, self.decay)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# FeatUp's schedule (configs/implicit_upsampler.yaml, train_implicit_upsampler.py): n_images
# 3000 views, pca_batch 50, PCA 128, 1200 steps x 10 views, NAdam at its default lr 2e-3, constant;
# max_zoom 1.8, max_pad 30 (at 224 px), n_freqs 30, dropout 0.2, σ learned from the start. The
# loss runs on upfeat's engine, shared with "fast" so that only the schedule differs: codes
# compared in a random 32-dim subspace (projected before warping) and an attention window of one
# stride (the authors' 29 px window costs 9x more per view on CPU).
REFERENCE = Schedule("reference", pool=3000, pca_views=50, steps=1200, views=10, lr=2e-3,
                     proj_dim=32, tv_weight=0.05)

# Measured on CamVid val at 112x154 (benchmarks/bench_implicit.py, README; 8 images, probe B
# = per-method probe): what each choice is worth.
# - It corrects the shipped JBU's output (base="jbu") instead of starting from a random network:
#   62.6 mIoU vs 57.6 without a base (bilinear base: 60.8; the JBU alone: 61.1), and it needs
#   300 steps instead of 600 for that (150 steps: 62.3).
# Why it needs fewer steps than "reference" even without a base:
# - every step runs at half resolution (network, warps and a half-stride downsampler: 4x cheaper),
#   on a grid shifted by a random sub-pixel offset each step so every position gets trained;
# - σ is fixed for the first 70 % of the steps (a σ learned from the start absorbs the early
#   errors and slows the fit down), Adam with a cosine decay instead of a constant rate;
# - frequencies up to e^4.5 instead of e^10: coordinate features above the sampling rate alias
#   into a fixed high-frequency pattern that the fit must first learn to cancel; no dropout;
# - 64 backbone views, not 3000; with 32 the field learns patterns periodic in the token grid;
# - the un-jittered view is in every step ("anchor"): +1.5 mIoU (transfer probe), +0.4 (own).
# Cost (issue 16; benchmarks/results/implicit_224): 128 views, 300 steps x 8 views, 30
# frequencies in float32 took 108 s of CPU per 224 x 294 image. Now: 64 views and 120 steps x 4
# views (the base does most of the work: 150 steps instead of 300 lost 0.3 mIoU on probe B at
# 112 x 154), 15 frequencies (the encoding and its LayerNorm were a third of a step), backbone
# and MLP products in bfloat16 where the CPU has it (2.7x faster backbone views).
FAST = Schedule("fast", pool=64, pca_views=32, steps=120, views=4, lr=5e-3, optimizer="adam",
                decay="cosine", warmup=10, proj_dim=32, tv_weight=0.05, coarse=1.0,
                sigma_warmup=0.7, anchor=True, base="jbu", dropout=0.0, n_freqs=15,
                log_max=4.5, bf16=True)

SCHEDULES = {"fast": FAST, "reference": REFERENCE}


def get_schedule(schedule: str | Schedule) -> Schedule:
    """A registered schedule by name, or ``schedule`` itself."""
    if isinstance(schedule, Schedule):
        return schedule
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise unknown_name(schedule, SCHEDULES, "schedule")
    return SCHEDULES[schedule]
