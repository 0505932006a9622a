"""Write docs/figures/pca_<backbone>.png: sample images beside the PCA of their features.

    python benchmarks/make_pca_figure.py [--backbone vits14_focus] [--size 448]

Middle column: one PCA basis fitted on all images jointly, so equal colours mean similar
features across images. Right column: a PCA fitted on each image alone (finer parts).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import upfeat
from upfeat.viz import fit_pca, pca_rgb, save_grid

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data" / "samples"
IMAGES = ["skimage/astronaut.jpg", "skimage/chelsea.jpg", "skimage/coffee.jpg",
          "featup/bird_full.jpg", "featup/dog_man_1_crop.jpg", "featup/skate.jpg",
          "featup/plant.jpg", "featup/cones2.jpg"]


def load(path: Path, size: int) -> torch.Tensor:
    """(3, H, W) in [0, 1], longer side ``size``."""
    img = Image.open(path).convert("RGB")
    scale = size / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="vits14_focus")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    backbone = upfeat.backbones.create(args.backbone)
    images = [load(SAMPLES / name, args.size) for name in IMAGES]
    with torch.inference_mode():
        feats = [backbone(img[None])[0] for img in images]
    basis = fit_pca(torch.cat([f.flatten(1) for f in feats], 1)[:, None])
    rows = [[img, pca_rgb(f, basis), pca_rgb(f)] for img, f in zip(images, feats)]
    half = (len(rows) + 1) // 2  # two triplets per row keeps the figure compact
    grid = [rows[i] + (rows[i + half] if i + half < len(rows) else []) for i in range(half)]
    out = args.out or ROOT / "docs" / "figures" / f"pca_{args.backbone}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid, out, titles=["image", f"{args.backbone}: joint PCA", "per-image PCA"] * 2,
              cell_inches=2.5)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
