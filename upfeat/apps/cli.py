"""The ``upfeat`` command line (typer). Heavy imports happen inside the commands."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._cli_errors import user_errors

app = typer.Typer(help="Sharp, full-resolution features for any vision backbone (FeatUp).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.callback()
def _root() -> None:
    """Sharp, full-resolution features for any vision backbone (FeatUp)."""


from ._cli_options import dataclass_options, json_dict as _json_dict
from ..train.config import TrainConfig


@app.command()
@user_errors
@dataclass_options(TrainConfig, always=("out", "resume", "progress"))
def train(given: dict) -> None:
    """Train an upsampler on a folder of images: FeatUp's multi-view consistency loss, or
    (--objective scale) real 2x targets for one JBU shared by several backbones.

    Every option is a field of upfeat.train.TrainConfig; with --resume, options not given continue the saved run."""
    from ..checkpoint import read_meta
    from ..train import fit
    from ..train.engine import CKPT, RUN_STATS

    if given.get("objective") == "scale" and "upsampler" not in given:
        given["upsampler"] = "jbu_cells"
    base: dict = {}
    ckpt = Path(given["out"]) / CKPT
    if given["resume"] and ckpt.is_file():  # unspecified options continue the saved run
        base = {k: v for k, v in read_meta(ckpt)["train"].items() if k not in RUN_STATS}
    if not given.get("data") and not base.get("data"):
        raise typer.BadParameter("--data is required (a folder of images)", param_hint="--data")
    cfg = TrainConfig.from_dict({**base, **given})
    path = fit(cfg)  # bad settings, missing files or weights: one line, exit 2 (user_errors)
    typer.echo(f"model: {path}")


@app.command()
@user_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the demo on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 7860,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, in MB.")] = 20.0,
    max_side: Annotated[int, typer.Option(help="Images are downscaled to this longer side (pixels) before inference.")] = 640,
    examples: Annotated[Optional[Path], typer.Option(help="Folder of example photos (default: $UPFEAT_SAMPLES, else ../shared/data/samples from the current directory, when it exists).", show_default=False)] = None,
    share: Annotated[bool, typer.Option("--share", help="Also make a public Gradio share link (off: nothing leaves this machine).")] = False,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the page in a web browser.")] = False,
) -> None:
    """Local web demo (Gradio): upload an image, see its low-res and upsampled features side by side."""
    from ._samples import default_samples
    from ..io import find_images
    from .serve import serve as run_server

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    folder = examples if examples is not None else default_samples()
    photos = find_images(folder) if examples is not None or folder.is_dir() else []
    run_server(host, port, max_upload_mb, max_side, photos, share, open_browser, echo=typer.echo)


@app.command()
@user_errors
def upsample(
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder: <relative path>.<format> per image.")],
    backbone: Annotated[str, typer.Option(help="Registered backbone name or timm:<name>.")] = "vits14_focus",
    backbone_args: Annotated[Optional[str], typer.Option(help="JSON keywords for the backbone, e.g. '{\"layers\": -2}'.")] = None,
    upsampler: Annotated[str, typer.Option(help="jbu (the shipped backbone-agnostic JBU; jbu:vits14_focus for the ViT's own), nearest, bilinear, bicubic, upsample_anything (training-free, fitted per image), or a checkpoint path / run folder.")] = "jbu",
    format: Annotated[str, typer.Option("--format", help="safetensors (tensor 'features' + metadata) or npy (+ a .json sidecar).")] = "safetensors",
    viz: Annotated[bool, typer.Option("--viz", help="Also write <name>.pca.png: image | low-res | upsampled (PCA).")] = False,
    size: Annotated[Optional[tuple[int, int]], typer.Option(help="Resize every image to H W first.", show_default=False)] = None,
    max_side: Annotated[Optional[int], typer.Option(help="Shrink images whose longer side exceeds N pixels (aspect kept).")] = None,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32 or float16 (compute is float32).")] = "float32",
    max_memory: Annotated[str, typer.Option(help="Memory budget per process (4GB, 512MB, 50% of available RAM); larger images are tiled.")] = "4GB",
    tile: Annotated[Optional[int], typer.Option(help="Force tiles of N pixels (a multiple of the stride) instead of choosing from --max-memory.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute outputs that already exist (default: skip them).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    accelerator: Annotated[str, typer.Option(help="cpu, cuda, auto.")] = "auto",
    devices: Annotated[int, typer.Option(help="Processes/GPUs per node; each takes every N-th image.")] = 1,
    strategy: Annotated[str, typer.Option(help="auto (one process) or ddp.")] = "auto",
    num_nodes: Annotated[int, typer.Option(help="Nodes (multi-node DDP).")] = 1,
    shard: Annotated[Optional[str], typer.Option(help="i/n: process only images i, i+n, ... of the sorted list (independent jobs, e.g. a SLURM array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).", show_default=False)] = None,
) -> None:
    """Write full-resolution features of images (any size; tiled when over --max-memory).

    Exit code 0: every image written or already done.

    Exit code 1: some files failed; each is reported on one line at the end, the others are written.

    Exit code 2: usage or setup error (missing input, unknown backbone, bad option), nothing run.
    """
    from ..inference.batch import UpsampleConfig, run

    cfg = UpsampleConfig(
        inputs=tuple(str(p) for p in inputs), out=str(out), backbone=backbone,
        backbone_kwargs=_json_dict(backbone_args, "--backbone-args") or {},
        upsampler=upsampler, format=format, viz=viz, size=size, max_side=max_side,
        dtype=dtype, max_memory=max_memory, tile=tile, overwrite=overwrite,
        progress=progress, accelerator=accelerator, devices=devices, strategy=strategy,
        num_nodes=num_nodes, shard=shard)
    summary = run(cfg)  # setup errors: one line, exit 2 (user_errors)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # rank 0 reports; a non-zero exit here would make Fabric kill the others
    typer.echo(summary.line(str(out)))
    for line in summary.failed:
        typer.echo(f"failed: {line}", err=True)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("demo.png"),
    images: Annotated[Optional[Path], typer.Option(help="Image file or folder (default: $UPFEAT_SAMPLES, else ../shared/data/samples from the current directory).", show_default=False)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Trained model (run folder or .safetensors from `upfeat train`) instead of the shipped JBU.", show_default=False)] = None,
    backbone: Annotated[Optional[list[str]], typer.Option(help="Backbone(s), one row per photo and backbone; repeat for several (default vits14_focus, or the checkpoint's).", show_default=False)] = None,
    max_side: Annotated[int, typer.Option(help="Shrink photos to this longer side (pixels) first.")] = 448,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Offline demo: one PNG, a row per photo: image | low-res | bilinear | JBU (PCA colours)."""
    from ._samples import samples_or_default
    from .demo_figure import demo_figure

    fig = demo_figure(out, samples_or_default(images), checkpoint, max_side, progress, note=typer.echo,
                      backbones=backbone)
    for line in fig.skipped:
        typer.echo(f"skipped: {line}", err=True)
    typer.echo(f"wrote {fig.path} ({len(fig.photos)} photo(s))")


from .eval_cli import eval_app  # noqa: E402  (`upfeat eval probe|cam`)

app.add_typer(eval_app, name="eval")


@app.command()
@user_errors
def implicit(
    image: Annotated[Path, typer.Argument(help="Image file.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output .safetensors (a <stem>.json sidecar is written beside it).", show_default=False)],
    backbone: Annotated[str, typer.Option(help="Registered backbone name or timm:<name>.")] = "vits14_focus",
    size: Annotated[Optional[tuple[int, int]], typer.Option(help="Resize the image to H W before fitting.", show_default=False)] = None,
    viz: Annotated[Optional[Path], typer.Option(help="Also write a PNG: image | low-res | implicit (PCA).", show_default=False)] = None,
    schedule: Annotated[str, typer.Option(help="fast (default) or reference (the authors' 3000 views, 1200 steps x 10 views).")] = "fast",
    steps: Annotated[Optional[int], typer.Option(help="Override the schedule's optimiser steps.", show_default=False)] = None,
    views: Annotated[Optional[int], typer.Option(help="Override the schedule's views per step.", show_default=False)] = None,
    base: Annotated[Optional[str], typer.Option(help="Upsampler whose output the network corrects: none (the authors' network alone), bilinear, jbu (the shipped backbone-agnostic JBU, else bilinear), or an `upfeat train` checkpoint. Default: the schedule's (fast: jbu, reference: none).", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the views, projections and initialisation.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Fit FeatUp's implicit upsampler to one image; the saved field can be queried at any size."""
    import time

    from .implicit_file import fit_file

    t0 = time.perf_counter()
    field = fit_file(image, backbone, out, size=size, viz=viz, schedule=schedule,
                     steps=steps, views=views, seed=seed, progress=progress, base=base)
    s = field.meta["schedule"]
    H, W = field.image_size
    typer.echo(f"{image} ({H}x{W}): {s['name']} schedule, {s['pool']} backbone views, "
               f"{s['steps']} steps x {s['views']} views on the {field.meta['base']} base in "
               f"{time.perf_counter() - t0:.1f} s "
               f"-> {out}" + (f", {viz}" if viz else ""))


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="upfeat")
