"""The training loop on Lightning Fabric: one code path for 1 CPU, DDP over processes, GPUs, nodes.

Layout of ``cfg.out``: ``checkpoints/last.safetensors`` (weights + optimiser + step + RNG, written
atomically every ``ckpt_every`` steps), ``model.safetensors`` + ``model.json`` (the final model for
:func:`upfeat.load`), ``metrics.csv``, ``loss.png``, ``config.json``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__, backbones
from ..checkpoint import CheckpointError, load_checkpoint, load_module_state, save_checkpoint, subdict
from .._device import bf16_fast
from ..jitter import sample_views
from .config import TrainConfig
from .data import FILE_LIST, STEP, TrainBatches, batch_loader, derive_seed, list_files
from .log import CsvLog, plot_curve
from .objective import MultiViewObjective, view_targets
from .scale import ScaleObjective, scale_crop, scale_targets
from .state import optimizer_from_tensors, optimizer_to_tensors

CKPT = Path("checkpoints") / "last.safetensors"
RUN_STATS = ("step", "elapsed_s", "world_size")  # in a checkpoint's "train" JSON, not TrainConfig
LOSSES = {"multiview": ("loss", "nll", "crf", "tv", "kernel"), "scale": ("loss", "feat", "recon")}
PARTS = {"multiview": ("upsampler", "downsampler", "criterion"), "scale": ("upsampler",)}


def model_meta(cfg: TrainConfig, backbone, objective: torch.nn.Module, step: int,
               elapsed: float, world_size: int) -> dict:
    """The JSON config stored with every checkpoint of this run (``backbone``: the first one)."""
    meta = {"format": "upfeat.model/1", "upfeat_version": __version__,
            "backbone": {"name": cfg.backbones[0], "kwargs": cfg.backbone_kwargs,
                         "dim": backbone.dim, "stride": backbone.stride},
            "upsampler": objective.upsampler.config(),
            "train": {**cfg.to_dict(), "step": step, "elapsed_s": round(elapsed, 1),
                      "world_size": world_size}}
    if cfg.objective == "multiview":
        meta["downsampler"] = {"name": cfg.downsampler, **cfg.downsampler_kwargs}
    if len(cfg.backbones) > 1 or cfg.objective != "multiview":
        meta["backbones"] = cfg.backbones
    return meta


def resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, dict | None, dict | None]:
    """Check ``cfg.out`` against ``cfg.resume``; returns ``(cfg, tensors, meta)`` of the resume
    checkpoint (``None`` when starting fresh). Never overwrites an existing run without --resume."""
    ckpt = Path(cfg.out) / CKPT
    if not ckpt.is_file():
        if cfg.resume:
            print(f"--resume: no checkpoint at {ckpt} yet, starting from step 0")
        elif (Path(cfg.out) / "model.safetensors").exists():
            raise FileExistsError(f"{cfg.out} already holds a finished run (model.safetensors); "
                                  f"choose another --out")
        return cfg, None, None
    if not cfg.resume:
        raise FileExistsError(f"{cfg.out} already has a checkpoint ({ckpt}); pass --resume to "
                              f"continue it or choose another --out")
    tensors, meta = load_checkpoint(ckpt)
    saved = TrainConfig.from_dict({k: v for k, v in meta["train"].items()
                                   if k not in RUN_STATS})
    diff = saved.model_differences(cfg)
    if diff:
        raise CheckpointError(f"{ckpt} was trained with different settings; resuming would mix "
                              f"two runs: {'; '.join(diff)}")
    return cfg, tensors, meta


def fit(cfg: TrainConfig) -> Path:
    """Train ``cfg``; returns the path of the final ``model.safetensors`` (on every rank)."""
    from lightning.fabric import Fabric

    cfg, tensors, meta = resolve_config(cfg)
    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                    num_nodes=cfg.num_nodes, precision=cfg.precision)
    fabric.launch()
    out, rank, world = Path(cfg.out), fabric.global_rank, fabric.world_size
    start, elapsed = (0, 0.0) if meta is None else (meta["train"]["step"], meta["train"]["elapsed_s"])

    scale, parts, loss_keys = cfg.objective == "scale", PARTS[cfg.objective], LOSSES[cfg.objective]
    nets = [fabric.to_device(backbones.create(name, **cfg.backbone_kwargs).requires_grad_(False).eval())
            for name in cfg.backbones]
    backbone = nets[0]
    bf16 = cfg.backbone_precision == "bf16-true" or (
        cfg.backbone_precision == "auto" and bf16_fast(fabric.device))
    crops = [2 * scale_crop(cfg.image_size, b.stride) if scale else cfg.image_size for b in nets]
    # the file list is cached in the run folder: a resumed run draws from the same list; a fresh
    # run lists anew (a list left by a run killed before its first checkpoint may be stale)
    files = list_files(cfg.data, out / FILE_LIST, write=rank == 0, reuse=meta is not None)
    data = TrainBatches(files, max(cfg.image_size, math.ceil(cfg.image_size * cfg.resize)),
                        cfg.batch_size, cfg.seed, crops, rank, world)
    del files  # the dataset keeps a compact copy (forked workers share it)
    data.read(data.indices(start)[0])  # no readable image at all: one clear error, here
    torch.manual_seed(cfg.seed)  # parameter initialisation
    make = ScaleObjective if scale else MultiViewObjective
    objective = make.from_config(cfg, [b.dim for b in nets] if not scale else backbone.dim,
                                 [b.stride for b in nets] if not scale else backbone.stride)
    if tensors is not None:
        for name in parts:
            load_module_state(getattr(objective, name), subdict(tensors, name), name, out / CKPT)
    params = list(objective.parameters())
    groups = [{"params": [p for p in params if p.ndim > 0], "lr_mult": 1.0},
              {"params": [p for p in params if p.ndim == 0], "lr_mult": cfg.scalar_lr}]
    optimizer = torch.optim.NAdam([g for g in groups if g["params"]], lr=cfg.lr)
    objective, optimizer = fabric.setup(objective, optimizer)
    if tensors is not None:
        optimizer_from_tensors(optimizer, tensors, meta["state"]["optimizer"], str(out / CKPT))
        torch.set_rng_state(tensors["rng.torch"])

    def save(step: int, final: bool = False) -> None:
        if rank == 0:
            m = objective.module if hasattr(objective, "module") else objective
            weights = {f"{n}.{k}": v for n in parts for k, v in getattr(m, n).state_dict().items()}
            info = model_meta(cfg, backbone, m, step, elapsed, world)
            opt_t, opt_j = optimizer_to_tensors(optimizer)
            save_checkpoint(out / CKPT, {**weights, **opt_t, "rng.torch": torch.get_rng_state()},
                            {**info, "state": {"optimizer": opt_j}})
            if final:
                save_checkpoint(out / "model.safetensors", weights, info, sidecar=True)
            plot_curve(out / "metrics.csv", out / "loss.png")
        fabric.barrier()

    log = CsvLog(out / "metrics.csv", resume_step=start) if rank == 0 else None
    if rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    bar = tqdm(total=cfg.steps, initial=start, disable=rank != 0 or not cfg.progress,
               desc=f"train {cfg.upsampler} on {cfg.backbone} ({cfg.objective})", dynamic_ncols=True)
    objective.train()
    batches = iter(batch_loader(data, range(start, cfg.steps), cfg.workers,
                                pin_memory=fabric.device.type == "cuda"))
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        image = fabric.to_device(next(batches)).float().div_(255)
        wait = time.perf_counter() - t0  # receiving + converting the batch; + decoding if behind
        seed = derive_seed(cfg.seed, STEP, step, rank)
        torch.manual_seed(seed)  # dropout etc.: a function of (seed, step, rank), so resumable
        gen = torch.Generator(device=fabric.device).manual_seed(seed)
        which = step % len(nets)  # several backbones: one per step, in turn
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        if scale:
            losses = objective(*scale_targets(nets[which], image), nets[which].stride)
        else:
            views = sample_views(cfg.views, torch.Generator().manual_seed(seed),
                                 tuple(image.shape[-2:]), max_zoom=cfg.max_zoom, max_pad=cfg.max_pad)
            net = nets[which]
            view_images, lr_feats, view_feats = view_targets(net, image, views, bf16)
            with torch.no_grad():
                if len(nets) > 1:  # one loss scale for all (vgg16_hed's features are ~30x ViT's);
                    # the upsampler is linear in the features, so this changes only the loss scale
                    rms = lr_feats.pow(2).mean().sqrt().clamp_min(1e-6)
                    lr_feats, view_feats = lr_feats / rms, [f / rms for f in view_feats]
            losses = objective(image, lr_feats, views, view_images, view_feats, gen, which)
        fabric.backward(losses["loss"])
        if cfg.grad_clip is not None:
            fabric.clip_gradients(objective, optimizer, max_norm=cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        elapsed += dt
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            vals = fabric.all_reduce(torch.stack([losses[k].detach() for k in loss_keys]),
                                     reduce_op="mean").tolist()
            if not math.isfinite(vals[0]):
                raise FloatingPointError(f"loss became {vals[0]} at step {step + 1}; lower --lr "
                                         f"or set --grad-clip; last checkpoint is in {out / CKPT}")
            if log is not None:
                log.append({"step": step + 1, **dict(zip(loss_keys, vals)),
                            "lr": lr, "sec_per_step": dt, "data_wait_s": wait,
                            "elapsed_s": elapsed})
            bar.set_postfix(loss=f"{vals[0]:.4f}", s_per_step=f"{dt:.2f}")
        bar.update(1)
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    bar.close()
    save(cfg.steps, final=True)
    return out / "model.safetensors"
