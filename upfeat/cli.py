"""The ``upfeat`` command line (typer). Heavy imports happen inside the commands."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Sharp, full-resolution features for any vision backbone (FeatUp).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.callback()
def _root() -> None:
    """Sharp, full-resolution features for any vision backbone (FeatUp)."""


def _json_dict(text: Optional[str], option: str) -> Optional[dict]:
    if text is None:
        return None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"{option} must be a JSON object, e.g. '{{\"layers\": -2}}' ({e})")
    if not isinstance(d, dict):
        raise typer.BadParameter(f"{option} must be a JSON object, got {text!r}")
    return d


@app.command()
def train(
    data: Annotated[Optional[list[Path]], typer.Option(help="Image folder(s)/file(s), searched recursively; repeat for several.")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, model.safetensors, metrics.csv, loss.png.")] = Path("runs/jbu"),
    backbone: Annotated[Optional[str], typer.Option(help="Registered backbone name or timm:<name>.")] = None,
    backbone_args: Annotated[Optional[str], typer.Option(help="JSON keywords for the backbone, e.g. '{\"layers\": -2}'.")] = None,
    upsampler: Annotated[Optional[str], typer.Option(help="Upsampler to train (jbu_stack, resize_conv).")] = None,
    upsampler_args: Annotated[Optional[str], typer.Option(help="JSON keywords for the upsampler.")] = None,
    downsampler: Annotated[Optional[str], typer.Option(help="simple or attention.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Total optimiser steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step per process.")] = None,
    views: Annotated[Optional[int], typer.Option(help="Jittered views per image per step.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Square training crop side (pixels).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (NAdam).")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="cosine or constant (after warm-up).")] = None,
    crf_weight: Annotated[Optional[float], typer.Option(help="Bilateral smoothness weight.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of every random choice.")] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="cpu, cuda, auto.")] = None,
    devices: Annotated[Optional[str], typer.Option(help="Processes/GPUs per node (int or 'auto').")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="auto, ddp, ddp_spawn, fsdp, ...")] = None,
    num_nodes: Annotated[Optional[int], typer.Option(help="Nodes (multi-node DDP).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="32-true, bf16-mixed, 16-mixed.")] = None,
    ckpt_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint (weights, optimiser, step, RNG).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train an upsampler with FeatUp's multi-view consistency loss on a folder of images."""
    from .checkpoint import CheckpointError, read_meta
    from .train import TrainConfig, fit
    from .train.engine import CKPT, RUN_STATS

    given = {"backbone": backbone, "backbone_kwargs": _json_dict(backbone_args, "--backbone-args"),
             "upsampler": upsampler, "upsampler_kwargs": _json_dict(upsampler_args, "--upsampler-args"),
             "downsampler": downsampler, "steps": steps, "batch_size": batch_size, "views": views,
             "image_size": image_size, "lr": lr, "schedule": schedule, "crf_weight": crf_weight,
             "seed": seed, "accelerator": accelerator,
             "devices": (int(devices) if devices and devices.isdigit() else devices),
             "strategy": strategy, "num_nodes": num_nodes, "precision": precision,
             "ckpt_every": ckpt_every, "data": [str(d) for d in data] if data else None}
    given = {k: v for k, v in given.items() if v is not None}
    base: dict = {}
    ckpt = out / CKPT
    if resume and ckpt.is_file():  # unspecified options continue the saved run
        base = {k: v for k, v in read_meta(ckpt)["train"].items() if k not in RUN_STATS}
    if not given.get("data") and not base.get("data"):
        raise typer.BadParameter("--data is required (a folder of images)", param_hint="--data")
    try:
        cfg = TrainConfig.from_dict({**base, **given, "out": str(out), "resume": resume,
                                     "progress": progress})
        path = fit(cfg)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"model: {path}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the demo on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, in MB (larger: HTTP 413).")] = 20.0,
    max_side: Annotated[int, typer.Option(help="Images are downscaled to this longer side (pixels) before inference.")] = 640,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the page in a web browser.")] = False,
) -> None:
    """Local web demo: upload an image, see its low-res and upsampled features side by side."""
    from .serve import serve as run_server

    try:
        run_server(host, port, max_upload_mb, max_side, open_browser, echo=typer.echo)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:  # port taken, address not on this machine, no permission
        typer.echo(f"error: cannot listen on {host}:{port}: {e.strerror or e}", err=True)
        raise typer.Exit(2) from None


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="upfeat")
