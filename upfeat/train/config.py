"""Everything that defines a training run, as one JSON-serialisable dataclass."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..lr import warmup_cosine

OBJECTIVES = ("multiview", "scale")
BACKBONE_PRECISIONS = ("auto", "32-true", "bf16-true")

# Fields that may change when a run is resumed (how it runs, not what it learns).
RUNTIME_FIELDS = frozenset({"steps", "out", "resume", "devices", "strategy", "accelerator",
                            "num_nodes", "ckpt_every", "log_every", "progress", "data",
                            "workers"})


def opt(help: str, default=dataclasses.MISSING, *, factory=dataclasses.MISSING,
        cli: str | None = None):
    """A :class:`TrainConfig` field with its ``upfeat train`` help (and option name, default
    ``--field-name``): the one place a training option is declared."""
    meta = {"help": help, **({"cli": cli} if cli else {})}
    return field(default=default, default_factory=factory, metadata=meta)


@dataclass
class TrainConfig:
    """A multi-view training run (FeatUp's JBU recipe by default).

    Model: ``backbone`` (+ ``backbone_kwargs``, e.g. ``{"layers": -2}``), ``upsampler`` and
    ``downsampler`` (registered names + keyword arguments). Objective: ``views`` jittered views per
    image per step, random ``proj_dim`` projection, learned uncertainty, ``crf_weight``/
    ``tv_weight``/``kernel_weight`` regularisers (``crf_weight`` defaults to 0, not FeatUp's 0.001:
    on raw ViT features the bilateral term is ~1000x larger than on FeatUp's, so 0.001 weighs as
    much as the NLL and pulls the JBU toward a blur). Data: ``data`` folders/files of images, random
    ``image_size`` square crops after resizing the shorter side to ``image_size * resize``,
    streamed (decoded by ``workers`` DataLoader processes; the file list cached in ``out``, see
    :mod:`upfeat.train.data`).
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
    Every field is also an ``upfeat train`` option (help and name from :func:`opt`).
    """

    data: list[str] = opt("Image folder(s)/file(s), searched recursively; repeat for several.",
                          factory=list)
    out: str = opt("Run folder: checkpoints, model.safetensors, metrics.csv, loss.png.",
                   "runs/jbu")
    backbone: str = opt("Registered backbone name or timm:<name>; or a comma-separated list (one "
                        "per step, in turn) to train one backbone-agnostic upsampler "
                        "(--upsampler-args '{\"residual\": false, \"steps\": 5}', or --objective "
                        "scale).", "vits14_focus")
    backbone_kwargs: dict = opt("JSON keywords for the backbone, e.g. '{\"layers\": -2}'.",
                                factory=dict, cli="--backbone-args")
    objective: str = opt("multiview (FeatUp's, default) or scale (real 2x targets; trains the "
                         "backbone-agnostic jbu_cells).", "multiview")
    recon_weight: float = opt("scale objective: weight of the image-reconstruction term.", 0.0)
    upsampler: str = opt("Upsampler to train (jbu_stack, resize_conv; jbu_cells with --objective "
                         "scale).", "jbu_stack")
    upsampler_kwargs: dict = opt("JSON keywords for the upsampler.", factory=dict,
                                 cli="--upsampler-args")
    downsampler: str = opt("simple or attention.", "attention")
    downsampler_kwargs: dict = opt("JSON keywords for the downsampler.", factory=dict,
                                   cli="--downsampler-args")
    steps: int = opt("Total optimiser steps.", 2000)
    batch_size: int = opt("Images per step per process.", 2)
    views: int = opt("Jittered views per image per step.", 4)
    image_size: int = opt("Square training crop side (pixels).", 224)
    resize: float = opt("Resize the shorter side to image_size * resize before cropping.", 1.0)
    max_zoom: float = opt("Largest zoom of a jittered view.", 2.0)
    max_pad: int = opt("Largest padding of a jittered view (pixels).", 20)
    proj_dim: int | None = opt("Channels of the random projection of the loss.", 30)
    uncertainty: bool = opt("Learned per-pixel uncertainty in the loss.", True)
    crf_weight: float = opt("Bilateral smoothness weight (FeatUp: 0.001; see TrainConfig).", 0.0)
    tv_weight: float = opt("Total-variation weight.", 0.0)
    kernel_weight: float = opt("Weight of the downsampler's spatial-kernel magnitude.", 0.0)
    lr: float = opt("Peak learning rate (NAdam).", 1e-3)
    scalar_lr: float = opt("Learning-rate multiplier of scalar parameters.", 10.0)
    schedule: str = opt("cosine or constant (after warm-up).", "cosine")
    warmup: int = opt("Linear warm-up steps.", 50)
    min_lr: float = opt("Final learning rate of the cosine, as a fraction of --lr.", 0.1)
    grad_clip: float | None = opt("Clip the gradient norm to this value.", None)
    seed: int = opt("Seed of every random choice.", 0)
    workers: int = opt("DataLoader worker processes decoding images (0: in the training "
                       "process).", 2)
    accelerator: str = opt("cpu, cuda, auto.", "auto")
    devices: int | str = opt("Processes/GPUs per node (int or 'auto').", 1)
    strategy: str = opt("auto, ddp, ddp_spawn, fsdp, ...", "auto")
    num_nodes: int = opt("Nodes (multi-node DDP; see docs/cli.md, 'Large datasets and clusters').", 1)
    precision: str = opt("32-true, bf16-mixed, 16-mixed.", "32-true")
    backbone_precision: str = opt(
        "The frozen backbone's, for the multi-view targets: auto (bf16-true where the hardware "
        "has native bfloat16 products, e.g. AVX512-BF16/AMX CPUs, else 32-true), 32-true or bf16-true. "
        "bfloat16 features differ ~0.5 % (relative L2).", "auto")
    ckpt_every: int = opt("Steps between checkpoints.", 100)
    log_every: int = opt("Steps between metrics.csv rows.", 1)
    progress: bool = opt("Show a progress bar.", True)
    resume: bool = opt("Continue the run in --out from its last checkpoint (weights, optimiser, "
                       "step, RNG).", False)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")
        if isinstance(self.devices, str) and self.devices.isdigit():
            self.devices = int(self.devices)  # the CLI gives a string ('2' or 'auto')
        for name in ("steps", "batch_size", "views", "image_size", "ckpt_every", "log_every",
                     "num_nodes"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be an int >= 1, got {v!r}")
        need(isinstance(self.workers, int) and self.workers >= 0,
             f"workers must be an int >= 0, got {self.workers!r}")
        need(isinstance(self.warmup, int) and self.warmup >= 0, f"warmup must be >= 0, got {self.warmup!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr!r}")
        need(self.scalar_lr > 0, f"scalar_lr must be > 0, got {self.scalar_lr!r}")
        need(0 <= self.min_lr <= 1, f"min_lr is a fraction of lr in [0, 1], got {self.min_lr!r}")
        need(self.resize >= 1, f"resize must be >= 1, got {self.resize!r}")
        need(self.schedule in ("cosine", "constant"),
             f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip!r}")
        need(self.backbone_precision in BACKBONE_PRECISIONS, f"backbone_precision must be one "
             f"of {BACKBONE_PRECISIONS}, got {self.backbone_precision!r}")
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
