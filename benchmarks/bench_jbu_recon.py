"""Multi-view reconstruction error on CamVid *val*: bilinear vs the JBU, same downsampler.

    python benchmarks/bench_jbu_recon.py [--checkpoint vits14_focus_jbu] [--images 25]

For each upsampler ``σ↑`` and held-out image ``x``: ``mean_t ||σ↓(t(σ↑(f(x), x))) - f(t(x))||²``
over 4 random jitters ``t`` (:func:`upfeat.train.validate.reconstruction_error`), with the
checkpoint's own trained downsampler ``σ↓`` for every row, so the rows differ only in ``σ↑``.
Rows: ``bilinear``, ``jbu init`` (the same stack untrained: a colour bilateral filter) and the
trained checkpoint. Images: ``--images`` evenly spaced CamVid val images at 224 x 294 (never
seen in training). Lower is better; ``rel`` = error / variance of the targets.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import upfeat
from upfeat.io import load_image, to_tensor
from upfeat.model import load_downsampler
from upfeat.train.validate import reconstruction_error
from upfeat import upsamplers

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid" / "val" / "images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="vits14_focus_jbu")
    ap.add_argument("--images", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "jbu_recon.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = upfeat.load(a.checkpoint).eval()
    down = load_downsampler(a.checkpoint)
    names = sorted(DATA.glob("*.jpg"))
    pick = np.linspace(0, len(names) - 1, a.images).round().astype(int)
    imgs = [F.interpolate(to_tensor(load_image(names[i])), (224, 294), mode="bilinear",
                          antialias=True, align_corners=False).clamp(0, 1) for i in pick]
    init = upsamplers.create(**model.upsampler.config()).eval()  # same stack, untrained
    rows = {"bilinear": upsamplers.create("bilinear", model.upsampler.dim, model.upsampler.stride),
            "jbu init (untrained)": init, f"jbu ({a.checkpoint})": model.upsampler}
    out = {}
    print(f"CamVid val, {len(imgs)} images at 224x294, 4 views each, downsampler of {a.checkpoint}")
    print("| upsampler | mse | rel | seconds |\n|---|---|---|---|")
    for name, up in rows.items():
        t0 = time.perf_counter()
        r = reconstruction_error(up, down, model.backbone, imgs, views=4, seed=0)
        r["seconds"] = time.perf_counter() - t0
        out[name] = r
        print(f"| {name} | {r['mse']:.4f} | {r['rel']:.4f} | {r['seconds']:.0f} |", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"images": len(imgs), "size": [224, 294], "rows": out}, indent=1))


if __name__ == "__main__":
    main()
