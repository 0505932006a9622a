"""upfeat.eval.probe: known-answer probes on synthetic folders, pixel sampling, real CamVid."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from upfeat._checks import ShapeError
from upfeat.eval import datasets as D
from upfeat.eval.probe import ProbeConfig, run_probe, sample_pixels

from ._utils import skip_without_focus

SIZE = (24, 32)


@pytest.fixture(scope="session")
def focus_backbone():
    """The offline ViT-S/14 (skips when its weights are neither cached nor convertible)."""
    from upfeat import backbones

    skip_without_focus()
    return backbones.create("vits14_focus")


MIX = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.9, -0.7], [-0.6, 0.4, 0.8], [0.5, 0.5, 0.5]])


def features(image: torch.Tensor) -> torch.Tensor:
    """A fixed non-trivial per-pixel map: (B, 3, H, W) in [0, 1] -> (B, 5, H, W)."""
    x = torch.einsum("kc,bchw->bkhw", MIX, image * 2 - 1)
    return torch.cat([x, torch.sin(3 * x[:, :1])], 1)


def _images(root, split, n, seed):
    rng = np.random.default_rng(seed)
    (root / split / "images").mkdir(parents=True)
    imgs = []
    for i in range(n):
        a = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / split / "images" / f"{i:03d}.png")
        imgs.append(torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1))
    return imgs


def _seg_folder(root, void_region=True):
    """Labels = argmax of a linear map of the features (a probe can be exact); void in a corner."""
    w = torch.tensor([[1.0, 0.0, -1.0, 0.5, 0.3], [-1.0, 1.0, 0.2, 0.0, -0.4],
                      [0.3, -1.0, 1.0, -0.5, 0.6]])
    for split, n, seed in (("train", 6, 0), ("val", 3, 1)):
        (root / split / "labels").mkdir(parents=True)
        for i, img in enumerate(_images(root, split, n, seed)):
            lab = torch.einsum("kc,chw->khw", w, features(img[None])[0]).argmax(0).numpy()
            lab = lab.astype(np.uint8)
            if void_region:
                lab[:6, :6] = 255
            Image.fromarray(lab).save(root / split / "labels" / f"{i:03d}.png")


def _depth_folder(root, log: bool):
    """Depth (mm PNG) = linear (or exp-linear) function of the features; a band of invalid 0s."""
    a = torch.tensor([0.3, -0.2, 0.25, 0.1, 0.2])
    for split, n, seed in (("train", 5, 2), ("val", 3, 3)):
        (root / split / "depth").mkdir(parents=True)
        for i, img in enumerate(_images(root, split, n, seed)):
            z = torch.einsum("c,chw->hw", a, features(img[None])[0])
            metres = torch.exp(0.5 + 0.4 * z) if log else 2.0 + z
            mm = (metres * 1000).round().numpy().astype(np.uint16)
            mm[-3:] = 0  # invalid
            Image.fromarray(mm).save(root / split / "depth" / f"{i:03d}.png")


def test_seg_probe_known_answer(tmp_path):
    _seg_folder(tmp_path)
    train, val = D.folder(tmp_path, "train", num_classes=3), D.folder(tmp_path, "val", num_classes=3)
    res, probe = run_probe(features, train, val, ProbeConfig("seg", pixels_per_image=400))
    assert res.fit["train_pixels"] == 6 * 400
    assert res.metrics["pixels"] == 3 * (24 * 32 - 36)  # void corner excluded
    assert res.metrics["pixel_acc"] > 0.97 and res.metrics["miou"] > 0.93
    assert set(res.seconds) == {"train_features", "fit", "eval"}
    # the folded probe acts on raw features: same prediction as argmax of its own logits
    img = val[0].image[None]
    assert torch.equal(probe.predict(features(img)), probe(features(img)).argmax(1))
    with pytest.raises(ShapeError, match=r"probe expects feats \(B, 5, H, W\)"):
        probe(torch.zeros(1, 4, 3, 3))


@pytest.mark.parametrize("log,loss", [(False, "l2"), (True, "l2"), (False, "l1")])
def test_depth_probe_known_answer(tmp_path, log, loss):
    _depth_folder(tmp_path, log)
    train, val = D.folder(tmp_path, "train", target="depth"), D.folder(tmp_path, "val", target="depth")
    cfg = ProbeConfig("depth", pixels_per_image=500, log_depth=log, depth_loss=loss)
    res, _ = run_probe(features, train, val, cfg)
    assert res.metrics["pixels"] == 3 * 21 * 32  # the invalid rows do not count
    # depth is an exact (log-)linear function of the features, up to 1 mm PNG rounding
    assert res.metrics["rmse"] < 3e-3, res.metrics
    assert res.metrics["delta1"] == 1.0


def test_sampled_pixels_align_and_repeat(tmp_path):
    _seg_folder(tmp_path)
    train = D.folder(tmp_path, "train", num_classes=3)

    def coords(image):  # features = (row, col) of each pixel
        B, _, H, W = image.shape
        r, c = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        return torch.stack([r, c]).float()[None].expand(B, -1, -1, -1)

    cfg = ProbeConfig("seg", pixels_per_image=50, seed=3)
    x, y = sample_pixels(coords, train, cfg)
    assert x.shape == (6 * 50, 2)
    r, c = x.long().T
    labels = torch.stack([s.target for s in train])
    img_idx = torch.arange(6).repeat_interleave(50)
    assert torch.equal(labels[img_idx, r, c], y)      # each feature sits on its own label
    assert not ((r < 6) & (c < 6)).any()               # never a void pixel
    assert torch.equal(sample_pixels(features, train, cfg)[1], y)  # same pixels, any features
    assert not torch.equal(sample_pixels(coords, train, ProbeConfig("seg", 50, seed=4))[0], x)


def test_probe_config_defaults_and_errors():
    assert ProbeConfig("seg").weight_decay == 1e-4 and ProbeConfig("fgbg").weight_decay == 0.1
    assert ProbeConfig("fgbg", weight_decay=0.0).weight_decay == 0.0
    with pytest.raises(ValueError, match="task must be one of seg, fgbg, depth"):
        ProbeConfig("segm")
    with pytest.raises(ValueError, match="pixels_per_image must be a positive int"):
        ProbeConfig(pixels_per_image=0)
    with pytest.raises(ValueError, match="depth_loss must be 'l2' or 'l1'"):
        ProbeConfig("depth", depth_loss="huber")


def test_camvid_probe_end_to_end(data_dir, focus_backbone):
    """A few real CamVid images, ViT-S/14 features upsampled bilinearly: the probe must learn."""
    from upfeat.eval.cache import CachedBackbone
    from upfeat.eval.features import resolve

    size = (224, 294)
    train = D.subset(D.camvid(data_dir / "camvid", "train", size), 12)
    val = D.subset(D.camvid(data_dir / "camvid", "val", size), 4)
    bb = CachedBackbone(focus_backbone)
    cfg = ProbeConfig("seg", pixels_per_image=500, max_iter=100)
    results = {name: run_probe(resolve(name, bb), train, val, cfg)[0].metrics
               for name in ("nearest", "bilinear")}
    assert bb.cache.misses == 16  # the backbone ran once per image for both upsamplers
    for m in results.values():
        assert m["pixels"] == int(sum((val[i].target != 11).sum() for i in range(4)))
        assert m["pixel_acc"] > 0.6 and m["miou"] > 0.3, results
