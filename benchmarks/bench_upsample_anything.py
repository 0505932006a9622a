"""Upsample Anything on this CPU: time per image, image reconstruction, a feature-level check.

    python benchmarks/bench_upsample_anything.py            # ~10 min on 2 busy cores

1. Time per image (median of ``--repeats``) at 224² and 448² for ``vits14_focus`` (ViT-S/14, dim
   384): the backbone, the per-image fit (``steps`` Adam steps), the rendering of the features,
   and bilinear for scale; at ``--threads`` (default 2 and 1).
2. Image reconstruction PSNR (dB) on the sample photos at 224²: the fitted kernel, the same
   kernel at its initialisation (0 steps), and bilinear, each rebuilding the image from its copy
   at the feature grid (16 x 16), for the ``area`` (ours) and ``bilinear`` (paper) copies.
3. A feature-level check (no labels): upsample the 16 x 16 features of the 224² image and compare
   them, box-averaged to 32 x 32, with the backbone's own 32 x 32 features of the 448² image
   (mean cosine similarity; the "2x image as target" of JAFAR / AnyUp). Bilinear, the kernel at
   init, and after the fit, for both low-res copies.

Writes ``benchmarks/results/upsample_anything.{md,json}`` and prints the Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from _timing import median_time
from upfeat import backbones
from upfeat import upsamplers
from upfeat.upsamplers.upsample_anything import fit_params, init_params, mix_cells, ua_kernel

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data" / "samples"
PHOTOS = ["skimage/astronaut.jpg", "skimage/coffee.jpg", "featup/skate.jpg", "featup/plant.jpg",
          "featup/bird_full.jpg"]
OUT = ROOT / "benchmarks" / "results"


def load(path: Path, side: int) -> torch.Tensor:
    """Photo -> (1, 3, side, side) in [0, 1] (bicubic resize, square)."""
    img = Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def timings(bb, sides: list[int], threads: list[int], repeats: int, steps: int) -> list[dict]:
    rows = []
    img = load(SAMPLES / PHOTOS[0], max(sides))
    for n in threads:
        torch.set_num_threads(n)
        for side in sides:
            x = F.interpolate(img, size=(side, side), mode="area")
            with torch.inference_mode():
                feats = bb(x)
            up = upsamplers.create("upsample_anything", bb.dim, bb.stride, steps=steps)
            bil = upsamplers.create("bilinear", bb.dim, bb.stride)
            guide, size = x, tuple(feats.shape[-2:])
            t_bb = median_time(lambda: bb(x), repeats)
            with torch.inference_mode():
                t_total = median_time(lambda: up(feats, x), repeats)
                t_fit = median_time(lambda: up.fit(guide, size), repeats)
                t_bil = median_time(lambda: bil(feats, x), repeats)
            rows.append({"threads": n, "side": side, "grid": list(size), "backbone_s": t_bb,
                         "fit_s": t_fit, "render_s": max(t_total - t_fit, 0.0),
                         "upsample_anything_s": t_total, "bilinear_s": t_bil})
            print(rows[-1], flush=True)
    return rows


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a - b).pow(2).mean()))


def reconstruction(steps: int, k: int) -> list[dict]:
    rows = []
    for name in PHOTOS:
        x = load(SAMPLES / name, 224)
        row = {"photo": name}
        for mode in ("area", "bilinear"):
            params, lr_img = fit_params(x, (16, 16), steps=steps, k=k, downsample=mode)
            p0 = init_params(lr_img, 16.0, 0.12)
            row[f"{mode}_fit"] = psnr(mix_cells(lr_img, ua_kernel(params, x, lr_img, k)), x)
            row[f"{mode}_init"] = psnr(mix_cells(lr_img, ua_kernel(p0, x, lr_img, k)), x)
            bil = F.interpolate(lr_img, size=(224, 224), mode="bilinear", align_corners=False)
            row[f"{mode}_bilinear"] = psnr(bil, x)
        rows.append(row)
        print(row, flush=True)
    return rows


def feature_check(bb, steps: int) -> list[dict]:
    rows = []
    for name in PHOTOS:
        big = load(SAMPLES / name, 448)
        small = F.interpolate(big, size=(224, 224), mode="area")
        with torch.inference_mode():
            target, low = bb(big), bb(small)  # (1, 384, 32, 32), (1, 384, 16, 16)
        row = {"photo": name}

        def score(up) -> float:
            with torch.inference_mode():
                hr = F.adaptive_avg_pool2d(up(low, small), target.shape[-2:])
            return float(F.cosine_similarity(hr, target, dim=1).mean())

        row["bilinear"] = score(upsamplers.create("bilinear", bb.dim, bb.stride))
        for mode in ("area", "bilinear"):
            for n in (0, steps):
                up = upsamplers.create("upsample_anything", bb.dim, bb.stride, steps=n, downsample=mode)
                row[f"ua_{mode}_{n}"] = score(up)
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(res: dict) -> str:
    steps = res["steps"]
    lines = [f"Upsample Anything (`steps={steps}`, `k={res['k']}`, `lr=1e-3`), `vits14_focus`, "
             f"{res['machine']}; {res['load']}", "",
             "| threads | image | grid | backbone (s) | fit (s) | render (s) | upsample_anything total (s) "
             "| bilinear (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in res["timings"]:
        lines.append(f"| {r['threads']} | {r['side']}² | {r['grid'][0]}x{r['grid'][1]} | "
                     f"{r['backbone_s']:.2f} | {r['fit_s']:.2f} | {r['render_s']:.2f} | "
                     f"{r['upsample_anything_s']:.2f} | {r['bilinear_s']:.3f} |")
    lines += ["", "Image reconstruction PSNR (dB) at 224² from the 16 x 16 copy (area / bilinear copy):", "",
              "| photo | fit (area) | init (area) | bilinear (area) | fit (bilinear) | init (bilinear) "
              "| bilinear (bilinear) |", "|---|---|---|---|---|---|---|"]
    for r in res["reconstruction"]:
        lines.append(f"| {r['photo']} | " + " | ".join(f"{r[k]:.2f}" for k in (
            "area_fit", "area_init", "area_bilinear", "bilinear_fit", "bilinear_init",
            "bilinear_bilinear")) + " |")
    keys = ["bilinear", "ua_area_0", f"ua_area_{steps}", "ua_bilinear_0", f"ua_bilinear_{steps}"]
    lines += ["", "Feature check: mean cosine similarity of the 224² image's upsampled features "
              "(box-averaged to 32 x 32) with the 448² image's own features:", "",
              "| photo | bilinear | UA area, init | UA area, fit | UA bilinear copy, init "
              "| UA bilinear copy, fit |", "|---|---|---|---|---|---|"]
    for r in res["features"]:
        lines.append(f"| {r['photo']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    mean = {k: statistics.mean(r[k] for r in res["features"]) for k in keys}
    lines.append("| **mean** | " + " | ".join(f"**{mean[k]:.4f}**" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--sides", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--load", default="not recorded", help="What else ran on the machine.")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    bb = backbones.create("vits14_focus").eval()
    res = {"steps": args.steps, "k": 5, "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores", "load": args.load, "load_avg_start": os.getloadavg()}
    res["timings"] = timings(bb, args.sides, args.threads, args.repeats, args.steps)
    torch.set_num_threads(max(args.threads))
    res["reconstruction"] = reconstruction(args.steps, 5)
    res["features"] = feature_check(bb, args.steps)
    res["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "upsample_anything.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / "upsample_anything.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
