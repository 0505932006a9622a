"""Everything that defines a training run, as one JSON-serialisable dataclass."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..lr import warmup_cosine

OBJECTIVES = ("multiview", "scale")

# Fields that may change when a run is resumed (how it runs, not what it learns).
RUNTIME_FIELDS = frozenset({"steps", "out", "resume", "devices", "strategy", "accelerator",
                            "num_nodes", "ckpt_every", "log_every", "progress", "data"})


@dataclass
class TrainConfig:
    """A multi-view training run (FeatUp's JBU recipe by default).

    Model: ``backbone`` (+ ``backbone_kwargs``, e.g. ``{"layers": -2}``), ``upsampler`` and
    ``downsampler`` (registered names + keyword arguments). Objective: ``views`` jittered views per
    image per step, random ``proj_dim`` projection, learned uncertainty, ``crf_weight``/
    ``tv_weight``/``kernel_weight`` regularisers (``crf_weight`` defaults to 0, not FeatUp's 0.001:
    on raw ViT features the bilateral term is ~1000x larger than on FeatUp's, so 0.001 weighs as
    much as the NLL and pulls the JBU toward a blur). Data: ``data`` folders/files of images, random
    ``image_size`` square crops after resizing the shorter side to ``image_size * resize``.
    Optimiser: NAdam, ``lr`` with linear ``warmup`` steps then cosine decay to ``lr * min_lr``
    (``schedule="constant"``: no decay), optional ``grad_clip``; scalar parameters (the JBU's
    range temperature and spatial sigma) use ``lr * scalar_lr``: Adam moves a parameter by about
    ``lr`` per step, so at ``lr = 1e-3`` a sigma of 1 would need ~1000 steps just to halve.
    ``batch_size`` is per process.
    ``objective="scale"`` trains a backbone-agnostic upsampler (``jbu_cells``) on real
    high-resolution targets instead (:mod:`upfeat.train.scale`): ``image_size`` is then the side
    of the full crop (the upsampler sees its half-size copy), ``backbone`` may be a comma-separated
    list (one backbone per step, in turn), ``recon_weight`` weighs the image-reconstruction term;
    ``views``, ``downsampler`` and the multi-view loss options are unused.
    ``backbone`` may also be a comma-separated list with the multi-view objective: one
    backbone-agnostic upsampler (``jbu_stack`` with ``residual=False``) trained on each in turn,
    each with its own downsampler and loss, its features scaled to unit RMS (the shipped ``jbu``).
    Engine: Lightning Fabric ``accelerator``/``devices``/``strategy``/``num_nodes``/``precision``.
    """

    data: list[str] = field(default_factory=list)
    out: str = "runs/jbu"
    backbone: str = "vits14_focus"
    backbone_kwargs: dict = field(default_factory=dict)
    objective: str = "multiview"
    recon_weight: float = 0.0
    upsampler: str = "jbu_stack"
    upsampler_kwargs: dict = field(default_factory=dict)
    downsampler: str = "attention"
    downsampler_kwargs: dict = field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 2
    views: int = 4
    image_size: int = 224
    resize: float = 1.0
    max_zoom: float = 2.0
    max_pad: int = 20
    proj_dim: int | None = 30
    uncertainty: bool = True
    crf_weight: float = 0.0  # FeatUp: 0.001; see the docstring
    tv_weight: float = 0.0
    kernel_weight: float = 0.0
    lr: float = 1e-3
    scalar_lr: float = 10.0
    schedule: str = "cosine"
    warmup: int = 50
    min_lr: float = 0.1
    grad_clip: float | None = None
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    ckpt_every: int = 100
    log_every: int = 1
    progress: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")
        for name in ("steps", "batch_size", "views", "image_size", "ckpt_every", "log_every",
                     "num_nodes"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be an int >= 1, got {v!r}")
        need(isinstance(self.warmup, int) and self.warmup >= 0, f"warmup must be >= 0, got {self.warmup!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr!r}")
        need(self.scalar_lr > 0, f"scalar_lr must be > 0, got {self.scalar_lr!r}")
        need(0 <= self.min_lr <= 1, f"min_lr is a fraction of lr in [0, 1], got {self.min_lr!r}")
        need(self.resize >= 1, f"resize must be >= 1, got {self.resize!r}")
        need(self.schedule in ("cosine", "constant"),
             f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip!r}")
        need(self.objective in OBJECTIVES,
             f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        need(self.recon_weight >= 0, f"recon_weight must be >= 0, got {self.recon_weight!r}")
        if isinstance(self.data, str):
            self.data = [self.data]
        self.data = [str(d) for d in self.data]

    @property
    def backbones(self) -> list[str]:
        """The backbone names (``backbone`` split at commas)."""
        return [b.strip() for b in self.backbone.split(",") if b.strip()]

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) ``step``: linear warm-up, then cosine to ``lr * min_lr``."""
        return warmup_cosine(step, self.lr, self.steps, self.warmup, self.min_lr, self.schedule)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        return cls(**d)

    def model_differences(self, other: TrainConfig) -> list[str]:
        """Fields (other than runtime ones) whose values differ, as ``'name: a -> b'``."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k not in RUNTIME_FIELDS and a[k] != b[k]]
