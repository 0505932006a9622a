"""Design choices on the *development split*: linear probes on train-split data only (val is kept
for the tables of docs/results.md).

    python benchmarks/dev_split.py --backbone vits14_focus bilinear jbu '{"temperature": 1600}'
    python benchmarks/dev_split.py bilinear '{"base": "bilinear", "guided": [8, 0.001, 4]}'

Split: CamVid probe trained on every 3rd frame of the train sequences 0001TP and 0006R0 (55
images), scored on every 6th frame of 0016E5 (34); DAVIS probe trained on every 2nd frame of the
first 4 train sequences (sorted names), scored on every 2nd frame of the other 3. Probe protocol
of :mod:`upfeat.eval.probe` (1500 px per image, seed 0, 200 L-BFGS iterations, default weight
decay), sizes of ``benchmarks/eval_table.py``.

Each positional argument is one row: ``bilinear`` / ``bicubic`` / ``nearest``, ``jbu`` (the
shipped agnostic JBU; ``{"checkpoint": NAME_OR_PATH}`` for another), or a JSON object:

- keyword arguments of an untrained backbone-agnostic :class:`~upfeat.upsamplers.JBUStack`
  (``temperature``, ``sigma``, ``radius``, ``range_dim``, ...; 5 layers, no residual), i.e. the
  colour bilateral start the shipped stack was trained from; ``{}`` is that start itself;
- ``"checkpoint"``: start from trained weights instead; ``"tscale"`` / ``"sscale"`` multiply every
  layer's range temperature / spatial width; ``"iters": n`` applies the last (full-resolution)
  layer n times;
- ``"base": "bilinear"`` + ``"guided": [r, eps, s]``: He et al.'s colour guided filter (window
  radius r px, regulariser eps on [0, 1] RGB, coefficients computed at 1/s resolution: the fast
  guided filter) applied to the base's output (any row may take ``"guided"``).

Prints and appends one JSON line per row to ``--out`` (CamVid mIoU and boundary mIoU d=3, DAVIS
fg IoU and boundary fg IoU d=3, x100; CPU seconds). About 1-3 CPU minutes per row on one thread.
A row that cannot be built (bad JSON, unknown keyword, missing checkpoint): one line, exit code 1,
before any row runs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import upfeat
from upfeat.eval.cache import CachedBackbone, FeatureCache
from upfeat.eval.datasets import PixelDataset, auto_size, open_dataset
from upfeat.eval.features import resolve
from upfeat.eval.probe import ProbeConfig, run_probe
from upfeat.upsamplers import JBUStack, load_upsampler

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INTERP = ("nearest", "bilinear", "bicubic")


def dev_split(stride: int) -> dict[str, tuple[PixelDataset, PixelDataset]]:
    """``{"camvid": (probe train, probe eval), "davis": (...)}``, all from the train splits."""
    cv = open_dataset(DATA / "camvid", "train")
    seq = lambda p: p[0].split("_")[0]  # noqa: E731
    tr = [p for p in cv.pairs if seq(p) in ("0001TP", "0006R0")][::3][:55]
    ev = [p for p in cv.pairs if seq(p) == "0016E5"][::6]
    cv = replace(cv, keep_in_memory=True, size=auto_size(cv, stride))
    dv = open_dataset(DATA / "davis", "train")
    seqs = sorted({p[0].split("/")[0] for p in dv.pairs})
    dv = replace(dv, keep_in_memory=True, size=auto_size(dv, stride))
    in_ = lambda names: [p for p in dv.pairs if p[0].split("/")[0] in names][::2]  # noqa: E731
    return {"camvid": (replace(cv, pairs=tr), replace(cv, pairs=ev)),
            "davis": (replace(dv, pairs=in_(seqs[:4])), replace(dv, pairs=in_(seqs[4:])))}


def box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over each pixel's (2r+1)² window clipped at the borders, (B, C, H, W) -> same."""
    for dim in (-1, -2):
        n = x.shape[dim]
        c = F.pad(x.cumsum(dim).movedim(dim, -1), [1, 0]).movedim(-1, dim)
        i = torch.arange(n, device=x.device)
        hi, lo = (i + r + 1).clamp(max=n), (i - r).clamp(min=0)
        shape = [1] * x.dim()
        shape[dim] = n
        x = (c.index_select(dim, hi) - c.index_select(dim, lo)) / (hi - lo).to(x.dtype).view(shape)
    return x


def guided_filter(guide: torch.Tensor, p: torch.Tensor, r: int, eps: float, s: int = 1) -> torch.Tensor:
    """He et al.'s colour guided filter: guide (B, 3, H, W), p (B, C, H, W) -> (B, C, H, W);
    ``s > 1``: the coefficients at 1/s resolution, bilinearly upsampled (fast guided filter)."""
    B, C, H, W = p.shape
    I, q = guide, p
    if s > 1:
        lo = (max(1, H // s), max(1, W // s))
        I, q, r = F.interpolate(guide, lo, mode="area"), F.interpolate(p, lo, mode="area"), max(1, r // s)
    h, w = I.shape[-2:]
    mI, mq = box(I, r), box(q, r)
    cov_II = box(torch.stack([I[:, i] * I[:, j] for i in range(3) for j in range(3)], 1), r)
    cov_II = cov_II - torch.stack([mI[:, i] * mI[:, j] for i in range(3) for j in range(3)], 1)
    sigma = cov_II.permute(0, 2, 3, 1).reshape(B, h, w, 3, 3) + eps * torch.eye(3)
    cov_Iq = torch.cat([box(I[:, i:i + 1] * q, r) for i in range(3)], 1).view(B, 3, C, h, w)
    cov_Iq = cov_Iq - mI[:, :, None] * mq[:, None]
    a = torch.einsum("bhwij,bjchw->bichw", torch.linalg.inv(sigma), cov_Iq)
    b = mq - (a * mI[:, :, None]).sum(1)
    ma, mb = box(a.reshape(B, 3 * C, h, w), r), box(b, r)
    if s > 1:
        ma = F.interpolate(ma, (H, W), mode="bilinear", align_corners=False)
        mb = F.interpolate(mb, (H, W), mode="bilinear", align_corners=False)
    return (ma.view(B, 3, C, H, W) * guide[:, :, None]).sum(1) + mb


class Repeat(nn.Module):
    """A JBU layer applied ``n`` times at its output size (the later passes: no resize)."""

    def __init__(self, layer: nn.Module, n: int) -> None:
        super().__init__()
        self.layer, self.n = layer, n

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, size=None, sink=None) -> torch.Tensor:
        for _ in range(self.n):
            x = self.layer(x, guidance, size)
        return x


class Guided(nn.Module):
    """``guided_filter(image, base(feats, image), *args)``, in the Upsampler call form."""

    def __init__(self, base: nn.Module, r: int, eps: float, s: int = 1) -> None:
        super().__init__()
        self.base, self.args = base, (r, eps, s)
        self.dim, self.stride = base.dim, base.stride

    def forward(self, feats: torch.Tensor, image: torch.Tensor, output_size=None) -> torch.Tensor:
        x = self.base(feats, image, output_size)
        return guided_filter(F.interpolate(image, x.shape[-2:], mode="area"), x, *self.args)


class Row(nn.Module):
    def __init__(self, up: nn.Module) -> None:
        super().__init__()
        self.upsampler = up  # what upfeat.eval.features.resolve accepts besides Upsamplers


def build(row: str | dict, dim: int, stride: int) -> str | nn.Module:
    if isinstance(row, str):
        return row if row in INTERP else build({"checkpoint": row}, dim, stride)
    cfg = dict(row)
    guided = cfg.pop("guided", None)
    if "base" in cfg:
        up = upfeat.upsamplers.create(cfg.pop("base"), dim, stride)
    elif "checkpoint" in cfg:
        up = load_upsampler(cfg.pop("checkpoint"))[0].for_backbone(dim, stride)
    else:
        torch.manual_seed(0)  # the range projection's small random part
        kw = {k: cfg.pop(k) for k in list(cfg) if k not in ("tscale", "sscale", "iters")}
        up = JBUStack(dim, stride, residual=False, steps=5, **kw)
    if isinstance(up, JBUStack):
        with torch.no_grad():
            for layer in up.layers:
                layer.range_temp += math.log(cfg.get("tscale", 1.0))
                layer.sigma_spatial *= cfg.get("sscale", 1.0)
        if cfg.get("iters", 1) > 1:
            up.layers[-1] = Repeat(up.layers[-1], cfg["iters"])
    up = up.eval()
    return Row(Guided(up, *guided) if guided else up)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", help="row specs (see the module docstring)")
    ap.add_argument("--backbone", default="vits14_focus")
    ap.add_argument("--datasets", default="camvid,davis")
    ap.add_argument("--cache-dir", default=None, help="backbone feature cache on disk")
    ap.add_argument("--out", type=Path, default=Path("dev_split.jsonl"))
    a = ap.parse_args()
    bb = CachedBackbone(upfeat.backbones.create(a.backbone), FeatureCache(4096, a.cache_dir))
    split = dev_split(bb.stride)
    rows = []
    for text in a.rows:  # every row built before any is run: a bad one fails at once
        try:
            row = json.loads(text) if text.lstrip().startswith("{") else text
            rows.append((text, row, resolve(build(row, bb.dim, bb.stride), bb, label=text)))
        except (ValueError, TypeError, KeyError, OSError) as e:
            sys.exit(f"dev_split: bad row {text!r}: {type(e).__name__}: {e}")
    for text, row, src in rows:
        t = time.process_time()
        out: dict = {"backbone": a.backbone, "row": row}
        for name in a.datasets.split(","):
            train, val = split[name]
            res, _ = run_probe(src, train, val, ProbeConfig(train.task))
            main_key = "miou" if train.task == "seg" else "fg_iou"
            out[name] = round(100 * res.metrics[main_key], 2)
            out[f"{name} d3"] = round(100 * res.metrics[f"{main_key}_d3"], 2)
        out["cpu s"] = round(time.process_time() - t)
        print(json.dumps(out), flush=True)
        with a.out.open("a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
