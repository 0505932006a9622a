"""upfeat.eval.cv: folds of whole sequences, out-of-fold scoring, the choice on real DAVIS frames."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upfeat.eval import datasets as D
from upfeat.eval.cv import cv_folds, group_of, select_weight_decay
from upfeat.eval.probe import ProbeConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_folds_never_split_a_real_sequence():
    """DAVIS train: 7 sequences into 3 folds of whole sequences, of similar size; CamVid train:
    its 3 sequence prefixes are the 3 folds."""
    if not (DATA / "davis").is_dir() or not (DATA / "camvid").is_dir():
        pytest.skip("../shared/data not found")
    for ds, n_groups in ((D.davis(DATA / "davis", "train"), 7), (D.camvid(DATA / "camvid", "train"), 3)):
        names = [p[0] for p in ds.pairs]
        folds = cv_folds(names, 3)
        groups = [group_of(n) for n in names]
        assert len(set(groups)) == n_groups
        for g in set(groups):  # every group in exactly one fold
            assert len({int(f) for f, h in zip(folds, groups) if h == g}) == 1
        counts = torch.bincount(folds)
        assert counts.numel() == 3 and counts.min() > 0
    names = [p[0] for p in D.subset(D.davis(DATA / "davis", "train"), 32).pairs]
    counts = torch.bincount(cv_folds(names, 3))
    assert counts.max() <= 2 * counts.min(), counts  # runs of about equal size


def test_folds_edge_cases():
    assert cv_folds(["a_1", "a_2", "b_1"], 3).tolist() == [0, 0, 1]  # 2 groups -> 2 folds
    assert cv_folds(["f0", "f1", "f2", "f3", "f4", "f5"], 3).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="at least 2"):
        cv_folds(["only"], 3)
    with pytest.raises(ValueError, match="k >= 2"):
        cv_folds(["a", "b"], 1)


def _one_colour_images(root: Path, labels: list[int]) -> D.PixelDataset:
    """Image i: one flat colour (red = 10 * i), its mask all foreground or all background."""
    pairs = []
    for i, lab in enumerate(labels):
        img, mask = root / f"s{i // 2}_{i}.png", root / f"s{i // 2}_{i}_mask.png"
        Image.fromarray(np.full((8, 8, 3), (10 * i, 0, 0), np.uint8)).save(img)
        Image.fromarray(np.full((8, 8), 255 * lab, np.uint8)).save(mask)
        pairs.append((f"s{i // 2}_{i}", img, mask))
    return D.PixelDataset("fgbg", pairs, None, 2, None, ["background", "foreground"])


def _one_hot_colour(image: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) -> (1, 16, H, W): a one-hot code of the image's red level (its index)."""
    i = int(round(float(image[0, 0, 0, 0]) * 255 / 10))
    out = torch.zeros(1, 16, *image.shape[-2:])
    out[0, i] = 1.0
    return out


def test_held_out_images_are_never_trained_on(tmp_path):
    """Each image has its own one-hot feature and a random label: a probe that saw an image
    classifies it perfectly, one that did not can only guess from the prior. In-sample fg IoU is
    1; the out-of-fold score must be far below (it would be 1 with any leakage)."""
    labels = [1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0]
    ds = _one_colour_images(tmp_path, labels)
    cfg = ProbeConfig("fgbg", pixels_per_image=20, max_iter=50)
    best, scores = select_weight_decay(_one_hot_colour, ds, cfg, grid=(1e-4, 1e-2), k=3)
    assert set(scores) == {1e-4, 1e-2} and best in scores
    assert max(scores.values()) < 0.7, scores
    from upfeat.eval.probe import run_probe
    res, _ = run_probe(_one_hot_colour, ds, ds, cfg)  # in-sample: memorised
    assert res.metrics["fg_iou"] == pytest.approx(1.0)


def test_choice_on_real_davis_frames():
    """On real DAVIS train frames with colour-and-position features, an absurd weight decay (the
    probe collapses to the prior: fg IoU 0) scores below a sane one (weak features: ~4 %) and
    is not chosen."""
    if not (DATA / "davis").is_dir():
        pytest.skip("../shared/data not found")
    ds = D.subset(D.davis(DATA / "davis", "train", (48, 84)), 12)

    def feats(image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        return torch.cat([image, yy[None, None], xx[None, None], image * yy, image * xx], 1)

    cfg = ProbeConfig("fgbg", pixels_per_image=300, max_iter=60)
    best, scores = select_weight_decay(feats, ds, cfg, grid=(1e-3, 1e4), k=3)
    assert best == 1e-3, scores
    assert scores[1e-3] > scores[1e4] == 0.0, scores
