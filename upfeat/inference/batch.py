"""Batch feature extraction behind ``upfeat upsample``: files/folders in, one feature file each.

Behaviour (see :func:`run`):

- Inputs: files and folders (searched recursively); ``SRC_ROOT/a/b.jpg`` -> ``OUT/a/b.<format>``
  (details and clashes: :mod:`upfeat.inference.jobs`).
- Any size: ``--size H W`` / ``--max-side N`` resize the image first; the memory of each image is
  estimated (:mod:`upfeat.inference.memory`) and it is tiled (:mod:`upfeat.inference.tiled`) when one pass would
  exceed ``--max-memory``, the budget of the whole process (what it holds before the image,
  torch and the model, is measured and counted). Tiles stream to disk as they are computed
  (:class:`upfeat.inference.featfile.FeatureWriter`), so outputs may exceed RAM and never count
  against the budget.
- Re-runs skip an image only when its outputs are complete, readable and made with the same
  settings (backbone, upsampler and its weights, size, dtype, format, upfeat version: stored in
  each file); anything else is redone, with a note (``--overwrite`` recomputes everything).
  Options are checked first, so a bad option is an error even when everything is done.
- A run stopped by Ctrl-C or SIGTERM removes its temporary file; those of killed runs
  (SIGKILL, power loss) are removed by the next run into the same folder.
- A file that fails (unreadable, too large even tiled, disk full) is reported and skipped; the
  others are written. Every output appears atomically (temporary file + rename).
- Several processes (``--devices N --strategy ddp``, Lightning Fabric): rank ``r`` of ``n`` takes
  items ``r, r + n, ...`` of the sorted list, so no file is written twice; counts and failures are
  gathered on rank 0. Independent jobs (e.g. a SLURM array) split a folder with ``--shard i/n``:
  items ``i, i + n, ...`` (then split again between the job's ranks).
- The summary reports the throughput (images written per second of wall time).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..io import ImageReadError
from .featfile import DTYPES, FORMATS, FeatureWriter, write_features
from .jobs import Item, list_items, prepare

__all__ = ["Summary", "UpsampleConfig", "process", "run"]

ACCELERATORS = ("auto", "cpu", "cuda", "gpu")
Note = Callable[..., None]  # note(text, postfix=False): a message line, or the bar's postfix


@dataclass(frozen=True)
class UpsampleConfig:
    """Options of :func:`run` (the ``upfeat upsample`` flags). Invalid values raise one-line
    ``ValueError``s naming the option."""

    inputs: tuple[str, ...]
    out: str
    backbone: str = "vits14_focus"
    backbone_kwargs: dict = field(default_factory=dict)
    upsampler: str = "jbu"
    format: str = "safetensors"
    viz: bool = False
    size: tuple[int, int] | None = None
    max_side: int | None = None
    dtype: str = "float32"
    max_memory: str = "4GB"
    tile: int | None = None
    overwrite: bool = False
    progress: bool = True
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1
    shard: str | None = None  # "i/n": items i, i + n, ... of the sorted list

    def __post_init__(self) -> None:
        from .memory import parse_bytes
        if not self.inputs:
            raise ValueError("give at least one image file or folder")
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.size is not None and self.max_side is not None:
            raise ValueError("give --size or --max-side, not both")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"--size must be two positive ints H W, got {self.size!r}")
        for name in ("max_side", "tile"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {v!r}")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"--accelerator must be one of {', '.join(ACCELERATORS)}, got "
                             f"{self.accelerator!r}")
        if self.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
            raise ValueError(f"--accelerator {self.accelerator}: no CUDA device available")
        if self.strategy not in ("auto", "ddp"):
            raise ValueError(f"--strategy must be auto or ddp, got {self.strategy!r}")
        if self.devices < 1 or self.num_nodes < 1:
            raise ValueError(f"--devices and --num-nodes must be >= 1, got {self.devices}, "
                             f"{self.num_nodes}")
        parse_bytes(self.max_memory)
        self.shard_of()

    def shard_of(self) -> tuple[int, int]:
        """``(i, n)`` of ``--shard i/n`` (``(0, 1)``: everything)."""
        if self.shard is None:
            return 0, 1
        i, _, n = self.shard.partition("/")
        if not (i.strip().isdigit() and n.strip().isdigit() and 0 <= int(i) < int(n)):
            raise ValueError(f"--shard must be i/n with 0 <= i < n, e.g. 0/4, got {self.shard!r}")
        return int(i), int(n)

    @property
    def world(self) -> int:
        return self.devices * self.num_nodes


@dataclass
class Summary:
    """What a run did, over all processes."""

    total: int = 0
    written: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the processing loop (the slowest process)

    def line(self, out: str) -> str:
        rate = (f" in {self.seconds:.1f} s ({self.written / self.seconds:.2f} images/s)"
                if self.written and self.seconds > 0 else "")
        return (f"wrote {self.written}, skipped {self.skipped} already done, failed "
                f"{len(self.failed)} of {self.total} image(s) -> {out}{rate}")


def settings_of(cfg: UpsampleConfig, model: torch.nn.Module) -> str:
    """JSON of everything that shapes an output file's content: stored in it, and compared by
    re-runs, which skip a file only when it matches (and the file is complete)."""
    from ..checkpoint import weights_fingerprint
    return json.dumps({"backbone": cfg.backbone, "backbone_kwargs": cfg.backbone_kwargs,
                       "upsampler": cfg.upsampler, "weights": weights_fingerprint(model.upsampler),
                       "size": list(cfg.size) if cfg.size else None, "max_side": cfg.max_side,
                       "dtype": cfg.dtype, "format": cfg.format, "upfeat_version": __version__},
                      sort_keys=True)


def remove_stale_temps(item: Item) -> int:
    """Delete the temporary files that killed runs left for ``item``'s outputs; how many."""
    from ..checkpoint import stale_temps
    paths = [item.out, item.out.with_suffix(".json"), *([item.png] if item.png else [])]
    stale = [t for p in paths for t in stale_temps(p)]
    for t in stale:
        t.unlink(missing_ok=True)
    return len(stale)


@contextlib.contextmanager
def lean_memory():
    """Make freed memory leave the process, so what a budgeted run holds is what it uses:

    - the C++ kernels' pool of freed output buffers (up to ``UPFEAT_POOL_MB``, 1 GB by default,
      kept for reuse) is off, the previous limit restored on exit;
    - glibc (Linux) returns freed blocks of 1 MiB and more to the OS at once: by default its
      thresholds grow to 32 / 64 MiB after the first large frees, and a tile's channel groups
      then stay resident after they are freed (~50-80 MB measured per tile; this one stays).
    """
    import ctypes

    from ..ops.adaptive_conv import cpu
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass
    old = cpu.set_cache_limit(0)
    try:
        yield
    finally:
        cpu.set_cache_limit(old)


@contextlib.contextmanager
def sigterm_as_exit():
    """SIGTERM raises SystemExit (143) instead of killing the process outright, so temporary
    files are removed on the way out as on Ctrl-C (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def process(model: torch.nn.Module, item: Item, cfg: UpsampleConfig, budget: int,
            device: torch.device, note: Note, settings: str = "", base: int | None = None) -> None:
    """Compute and write the outputs of one image (``settings``: :func:`settings_of`); raises on
    failure. ``base``: bytes the process holds before any image (measured once per run, so the
    tile plan, hence a tiled backbone's output, never depends on the images processed before)."""
    import numpy as np

    from .memory import format_bytes, resident_memory
    from .planning import plan_memory
    from .preview import Preview, preview_bytes
    from .tiled import lowres_tiled, pixels, upsample_blocks, upsample_tiled
    img, original = prepare(item.src, cfg.size, cfg.max_side)
    dtype = DTYPES[cfg.dtype][0]
    item.out.parent.mkdir(parents=True, exist_ok=True)
    extra = preview_bytes(img.height, img.width) if item.png is not None else 0
    mem = plan_memory(model, (img.height, img.width), budget, dtype, output_in_memory=False,
                      tile=cfg.tile, base=resident_memory() if base is None else base,
                      extra=extra, uint8_image=True)
    free = shutil.disk_usage(item.out.parent).free
    need = model.dim * img.height * img.width * dtype.itemsize
    # + one band of rows parked in FeatureWriter's scratch file
    band = model.dim * min(mem.plan.tile, img.height) * img.width * dtype.itemsize
    band = band if len(mem.plan.xs) > 1 else 0
    if need + band > free:
        more = f" (+ {format_bytes(band)} while its tiles are written)" if band else ""
        raise OSError(f"the {model.dim}x{img.height}x{img.width} {cfg.dtype} output needs "
                      f"{format_bytes(need)} on disk{more}, only {format_bytes(free)} free in "
                      f"{item.out.parent}; use --max-side, --size or --dtype float16")
    if mem.is_tiled:
        note(mem.message(str(item.src)))
    # uint8, converted window by window (tiled.pixels): 3 bytes per pixel held, not 12
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None]
    x = x.to(device)
    del img
    H, W = mem.size
    meta = {"format": "upfeat.features/1", "backbone": cfg.backbone, "upsampler": cfg.upsampler,
            "source": str(item.src), "size": f"{H} {W}",
            "original_size": f"{original[0]} {original[1]}", "stride": model.stride,
            "dtype": cfg.dtype, "tiles": mem.plan.n_tiles,
            "backbone_tiles": mem.backbone_plan.n_tiles, "upfeat_version": __version__,
            "settings": settings}
    n_bb = mem.backbone_plan.n_tiles if mem.backbone_plan.tiled else 0
    total = n_bb + mem.plan.n_tiles
    t0, done = time.perf_counter(), 0

    def tick(now: int | None = None) -> None:  # per tile: the bar's postfix (it counts images)
        nonlocal done
        done = done + 1 if now is None else now
        rate = (time.perf_counter() - t0) / done
        note(f"tile {done}/{total}, {rate:.1f} s/tile, ~{rate * (total - done) / 60:.0f} min "
             f"left", True)

    def fill(out: FeatureWriter) -> None:
        with torch.inference_mode():
            lowres = lowres_tiled(model, x, mem.backbone_plan, progress=tick)
            preview = Preview(x[0], lowres[0], model.stride) if item.png is not None else None

            def write(block: torch.Tensor, y0: int, x0: int, c0: int) -> None:
                out.write(block[0], y0, x0, c0)
                if preview is not None:
                    preview.add(block[0], y0, x0, c0)
            if mem.plan.tiled:
                upsample_tiled(model, x, mem.plan, lowres=lowres, write=write,
                               progress=lambda d, n: tick(n_bb + d))
            else:
                upsample_blocks(model.upsampler, lowres, pixels(x), lambda b, c0: write(b, 0, 0, c0))
            if preview is not None:
                preview.save(item.png)

    write_features(item.out, (model.dim, H, W), dtype, meta, fill)


def _one_line(item: Item, e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, ImageReadError):
        return text
    if str(item.src) in text:
        return f"{item.src}: {text}"
    return f"{item.src}: {type(e).__name__}: {text}"


def _launch(cfg: UpsampleConfig) -> tuple[torch.device, int, int]:
    """Device, rank and world size; starts the other processes through Lightning Fabric."""
    if cfg.world == 1 and cfg.strategy == "auto":
        want = cfg.accelerator
        if want in ("cuda", "gpu") and not torch.cuda.is_available():
            raise ValueError(f"--accelerator {want}: no CUDA device available")
        use_cuda = want in ("cuda", "gpu") or (want == "auto" and torch.cuda.is_available())
        return torch.device("cuda" if use_cuda else "cpu"), 0, 1
    from datetime import timedelta

    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy
    # Ranks meet only at the end; a rank that dies takes the others down (Fabric's observer),
    # so a long wait for slow shards is safe.
    strategy = DDPStrategy(timeout=timedelta(days=7)) if cfg.strategy == "ddp" else "auto"
    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                    strategy=strategy)
    fabric.launch()
    return fabric.device, fabric.global_rank, fabric.world_size


def run(cfg: UpsampleConfig) -> Summary:
    """Write the features of every image of ``cfg.inputs`` (see the module docstring).

    Setup problems (missing input, unknown backbone or upsampler, bad option) raise before any
    image is processed; per-image failures are collected in :attr:`Summary.failed`.
    """
    from .. import backbones
    from .memory import format_bytes, parse_bytes, resident_memory
    from ..model import create_model
    from ..ops import empty_cache

    budget = parse_bytes(cfg.max_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list_items(cfg.inputs, cfg.out, cfg.format, cfg.viz)
    if not items:
        raise ValueError(f"no images found in {', '.join(cfg.inputs)}")
    shard, shards = cfg.shard_of()
    items = items[shard::shards]
    summary = Summary(total=len(items))
    # options and names are checked before anything is skipped: a bad option is an error even
    # when every output exists
    torch.manual_seed(0)  # randomly initialised parts are the same in every process and run
    model = create_model(backbones.create(cfg.backbone, **cfg.backbone_kwargs), cfg.upsampler)
    if cfg.viz and model.dim < 3:
        raise ValueError(f"--viz needs at least 3 feature channels, {cfg.backbone} has {model.dim}")
    s = model.stride
    if cfg.tile is not None and cfg.tile % s:
        raise ValueError(f"--tile {cfg.tile} must be a multiple of the stride {s} of "
                         f"{cfg.backbone}, e.g. {max(1, round(cfg.tile / s)) * s}")
    settings = settings_of(cfg, model)
    if not cfg.overwrite and all(it.done(settings) for it in items):
        _show_warnings(caught)
        summary.skipped = len(items)
        return summary
    device, rank, world = _launch(cfg)  # after the model: a bad name fails before any launch
    if rank == 0:
        _show_warnings(caught)
    model = model.to(device).eval()
    mine = items[rank::world]
    bar = tqdm(mine, disable=rank != 0 or not cfg.progress, dynamic_ncols=True,
               desc=f"upsample ({world} proc.)" if world > 1 else "upsample")
    if rank == 0:
        tqdm.write(f"{len(items)} image(s), budget {format_bytes(budget)} per process, "
                   f"{cfg.backbone} + {cfg.upsampler} on {device}"
                   f"{f' x {world} processes' if world > 1 else ''}")

    def note(text: str, postfix: bool = False) -> None:
        if postfix:
            bar.set_postfix_str(text, refresh=True)
        else:
            tqdm.write(text if world == 1 else f"[rank {rank}] {text}")

    base = resident_memory()  # once: every image is planned against the same baseline
    t0 = time.perf_counter()
    with sigterm_as_exit(), lean_memory():
        for item in bar:
            stale = remove_stale_temps(item)
            if stale:
                note(f"removed {stale} temporary file(s) a killed run left for {item.out}")
            reason = None if cfg.overwrite else item.redo_reason(settings)
            if reason is None and not cfg.overwrite:
                summary.skipped += 1
                continue
            if reason not in (None, "missing"):
                note(f"redoing {item.out}: {reason}")
            try:
                process(model, item, cfg, budget, device, note, settings, base)
                summary.written += 1
            except Exception as e:  # noqa: BLE001  (any per-image failure: report, keep going)
                summary.failed.append(_one_line(item, e))
            finally:
                empty_cache()  # the JBU kernel's buffer pool: sizes change between images
            bar.set_postfix_str("")
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return _gather(summary, world)


def _show_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"warning: {' '.join(str(w.message).split())}", file=sys.stderr)


def _gather(summary: Summary, world: int) -> Summary:
    if world == 1:
        return summary
    import torch.distributed as dist
    parts: list = [None] * world
    dist.all_gather_object(parts, summary)
    total = Summary(total=summary.total, seconds=max(p.seconds for p in parts))
    for p in parts:
        total.written += p.written
        total.skipped += p.skipped
        total.failed += p.failed
    return total
