"""``upfeat eval``: linear probes and CAM faithfulness from the command line.

``eval_app`` is a typer app; ``upfeat.apps.cli`` mounts it as ``upfeat eval``. Each command parses its
options and calls one function of :mod:`upfeat.eval.suite`.

Example::

    upfeat eval probe --data ../shared/data/camvid --upsampler nearest,bilinear,jbu --out runs/eval
    upfeat eval probe --data ../shared/data/camvid --upsampler bilinear,resize_conv=runs/rc
    upfeat eval probe --data ../shared/data/davis --upsampler bilinear,large_image --size 280 490
    upfeat eval cam --data ../shared/data/camvid --upsampler nearest,bilinear
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._cli_errors import user_errors

eval_app = typer.Typer(help="Evaluate upsamplers: linear probes (seg, fg/bg, depth) and CAM "
                            "faithfulness.", no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False)

UpsamplerOpt = Annotated[str, typer.Option(
    help="Comma-separated specs: nearest, bilinear, bicubic, upsample_anything (training-free, "
         "fitted per image), large_image (backbone on the 2x "
         "image), large_image4, jbu (the shipped <backbone>_jbu), implicit (one fit per image, "
         "~25 CPU-seconds each), or jbu=CHECKPOINT / resize_conv=CHECKPOINT (a checkpoint file or "
         "an `upfeat train` run folder).")]
SizeOpt = Annotated[Optional[tuple[int, int]], typer.Option(
    help="Evaluation size H W (images and targets are resized); default 224 high, width the "
         "multiple of the stride closest to the data's aspect (CamVid 224 294, DAVIS 224 392).")]
BackboneOpt = Annotated[str, typer.Option(help="Registered backbone name or timm:<name>.")]
CacheMbOpt = Annotated[float, typer.Option(help="In-memory backbone-feature cache budget (MB).")]
MaxTrainOpt = Annotated[Optional[int], typer.Option(help="Use only this many evenly spaced train images.")]
MaxEvalOpt = Annotated[Optional[int], typer.Option(help="Use only this many evenly spaced eval images.")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(help="Also cache backbone features as safetensors here.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars.")]


def _run(fn, **kwargs) -> dict:
    """Call ``fn`` logging to the terminal; bad input becomes one ``error:`` line, exit code 2,
    through the commands' :func:`~upfeat.apps._cli_errors.user_errors`."""
    return fn(log=typer.echo, **kwargs)


def _report(result: dict) -> None:
    for note in result["notes"]:
        typer.echo(f"note: {note}")
    for kind, path in result["paths"].items():
        typer.echo(f"{kind}: {path}")


@eval_app.command()
@user_errors
def probe(
    data: Annotated[Path, typer.Option(help="Dataset root: CamVid/folder layout (ROOT/{train,val}/images + labels|depth) or DAVIS (ROOT/images, ROOT/masks).")],
    upsampler: UpsamplerOpt = "nearest,bilinear",
    task: Annotated[Optional[str], typer.Option(help="seg, fgbg or depth (default: from the layout).")] = None,
    backbone: BackboneOpt = "vits14_focus",
    size: SizeOpt = None,
    split: Annotated[str, typer.Option(help="Split to evaluate on, e.g. val or test (the probe trains on 'train'; scoring on train images warns).")] = "val",
    out: Annotated[Path, typer.Option(help="Output folder for eval_<task>_<data>_<split>.{md,json,png}.")] = Path("runs/eval"),
    pixels_per_image: Annotated[int, typer.Option(help="Random valid train pixels per image.")] = 1500,
    seed: Annotated[int, typer.Option(help="Seed of the pixel sampling.")] = 0,
    max_iter: Annotated[int, typer.Option(help="L-BFGS iterations.")] = 200,
    weight_decay: Annotated[Optional[str], typer.Option(help="L2 penalty on the probe weights: a number (default per task: seg 1e-4, fgbg 0.1, depth 1e-4) or 'cv': chosen from 1e-4, 1e-3, 1e-2, 0.1 by cross-validation over train sequences on bilinear features, then used for every upsampler.", show_default=False)] = None,
    depth_loss: Annotated[str, typer.Option(help="Depth loss: l2 or l1.")] = "l2",
    log_depth: Annotated[bool, typer.Option("--log-depth", help="Regress log-depth.")] = False,
    void_id: Annotated[Optional[int], typer.Option(help="Label id to ignore (folder layout; default classes.json or 255).")] = None,
    depth_scale: Annotated[Optional[float], typer.Option(help="Depth PNG value per metre (default 1000).")] = None,
    show: Annotated[int, typer.Option(help="Val images in the qualitative figure.")] = 3,
    max_train_images: MaxTrainOpt = None,
    max_eval_images: MaxEvalOpt = None,
    cache_mb: CacheMbOpt = 2048,
    cache_dir: CacheDirOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Linear probe (1x1 conv) on upsampled features: train on 'train', report on --split.

    Seg / fg-bg also report boundary scores: mIoU / fg IoU over the pixels within d = 3 and 8 pixels (square window, at the evaluation size) of a ground-truth class boundary."""
    from ..eval.cv import parse_weight_decay
    from ..eval.suite import probe_suite

    kw = {k: v for k, v in (("void_id", void_id), ("depth_scale", depth_scale)) if v is not None}
    _report(_run(probe_suite, data=data, upsamplers=upsampler, task=task,
                 backbone=backbone, size=tuple(size) if size else None, split=split, out=out,
                 pixels_per_image=pixels_per_image, seed=seed, max_iter=max_iter,
                 weight_decay=parse_weight_decay(weight_decay), depth_loss=depth_loss, log_depth=log_depth,
                 cache_mb=cache_mb, cache_dir=cache_dir, show=show, progress=progress,
                 dataset_kwargs=kw, max_train=max_train_images, max_eval=max_eval_images))


@eval_app.command()
@user_errors
def cam(
    data: Annotated[Path, typer.Option(help="Segmentation dataset root (CamVid layout).")],
    upsampler: UpsamplerOpt = "nearest,bilinear",
    backbone: BackboneOpt = "vits14_focus",
    size: SizeOpt = None,
    split: Annotated[str, typer.Option(help="Split to evaluate on (the classifier trains on 'train'; scoring on train images warns).")] = "val",
    out: Annotated[Path, typer.Option(help="Output folder for eval_cam_<data>_<split>.{md,json,png}.")] = Path("runs/eval"),
    max_iter: Annotated[int, typer.Option(help="L-BFGS iterations of the presence classifier.")] = 300,
    min_fraction: Annotated[float, typer.Option(help="A class is present if it covers this fraction of the pixels.")] = 0.01,
    max_rate: Annotated[float, typer.Option(help="CAMs explain classes present in at most this fraction of train images.")] = 0.9,
    max_train_images: MaxTrainOpt = None,
    max_eval_images: MaxEvalOpt = None,
    cache_mb: CacheMbOpt = 2048,
    cache_dir: CacheDirOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """CAM faithfulness: Average Drop / Average Increase of CAMs made from upsampled features."""
    from ..eval.suite import cam_suite

    _report(_run(cam_suite, data=data, upsamplers=upsampler, backbone=backbone,
                 size=tuple(size) if size else None, split=split, out=out, max_iter=max_iter,
                 min_fraction=min_fraction, max_rate=max_rate, cache_mb=cache_mb, cache_dir=cache_dir,
                 progress=progress, max_train=max_train_images, max_eval=max_eval_images))
