"""The implicit-upsampler figure of docs/results.md, on sample photos whose licences allow it
(CamVid's CC BY-NC does not: the benchmark's CamVid figure is regenerated locally, not committed).

    python benchmarks/fig_implicit.py      # -> docs/figures/implicit.jpg, ~2 min per photo, 1 core

Rows: photos from ``../shared/data/samples`` (FeatUp's MIT-licensed samples, scikit-image's CC0 /
public-domain ones), shrunk to ``--max-side`` pixels. Columns: image | low-res ``vits14_focus``
features | bilinear | the shipped JBU | ``fit_implicit`` with the ``fast`` schedule (seed 0), all
coloured with one PCA basis per row (fitted on the low-res features).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import upfeat
from upfeat.io import to_tensor
from upfeat.inference.jobs import prepare
from upfeat import upsamplers
from upfeat.upsamplers.implicit import fit_implicit
from upfeat.viz import pca_panels, save_grid

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data" / "samples"
PHOTOS = ("featup/skate.jpg", "featup/dog_man_1_crop.jpg", "skimage/astronaut.jpg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", nargs="+", default=list(PHOTOS),
                    help="paths relative to ../shared/data/samples, or absolute")
    ap.add_argument("--max-side", type=int, default=224)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "implicit.jpg")
    args = ap.parse_args()
    model = upfeat.load("vits14_focus_jbu")
    bilinear = upsamplers.create("bilinear", dim=model.dim, stride=model.stride)
    rows = []
    for name in args.photos:
        img, _ = prepare(SAMPLES / name, None, args.max_side)
        x = to_tensor(img)
        t0 = time.perf_counter()
        field = fit_implicit(x, model.backbone, progress=False)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            low = model.lowres(x)
            ups = [bilinear(low, x)[0], model.upsampler(low, x)[0], field.query()[0]]
        rows.append(pca_panels(x[0], low[0], ups, model.stride))
        print(f"{name} {tuple(x.shape[-2:])}: implicit fit {seconds:.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(rows, args.out, titles=["image", "low-res vits14_focus", "bilinear", "JBU",
                                      "implicit (fast)"], cell_inches=3.6)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
