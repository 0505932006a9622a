"""upfeat.eval.datasets on the real CamVid / DAVIS data and on small generated folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from upfeat.eval import datasets as D


def _write_folder(root, split="train", n=3, size=(12, 16), target="labels", value=None):
    """ROOT/split/images/img{i}.png + ROOT/split/{target}/img{i}.png; returns the targets."""
    rng = np.random.default_rng(0)
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / target).mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / split / "images" / f"img{i}.png")
        if target == "depth":
            t = rng.integers(0, 6000, size, dtype=np.uint16)
        else:
            t = np.full(size, value, np.uint8) if value is not None else \
                rng.integers(0, 4, size, dtype=np.uint8)
        Image.fromarray(t).save(root / split / target / f"img{i}.png")
        out.append(t)
    return out


def test_camvid_real(data_dir):
    train = D.camvid(data_dir / "camvid", "train", (224, 294))
    val = D.camvid(data_dir / "camvid", "val", (224, 294))
    assert (len(train), len(val)) == (367, 101)
    assert train.num_classes == 11 and train.ignore_index == 11 and train.task == "seg"
    assert train.class_names[0] == "Sky" and train.class_names[10] == "Bicyclist"
    s = val[0]
    assert s.image.shape == (3, 224, 294) and s.image.dtype == torch.float32
    assert 0 <= float(s.image.min()) and float(s.image.max()) <= 1
    assert s.target.shape == (224, 294) and s.target.dtype == torch.int64
    assert set(s.target.unique().tolist()) <= set(range(12))
    # nearest resize keeps exact ids: same as resizing the PNG with our index rule
    raw = np.asarray(Image.open(val.pairs[0][2]))
    assert torch.equal(s.target, torch.from_numpy(D.resize_nearest(raw, (224, 294)).astype(np.int64)))
    assert D.auto_size(val, 14) == (224, 294)


def test_davis_split_by_sequence(data_dir):
    root = data_dir / "davis"
    train, val = D.davis(root, "train", (224, 392)), D.davis(root, "val", (224, 392))
    seqs = lambda ds: {name.split("/")[0] for name, _, _ in ds.pairs}  # noqa: E731
    assert seqs(train) == {"blackswan", "breakdance", "car-roundabout", "cows", "dog",
                           "drift-straight", "horsejump-high"}
    assert seqs(val) == {"bmx-trees", "camel", "car-shadow", "dance-twirl", "drift-chicane",
                         "goat", "kite-surf"}
    assert (len(train), len(val)) == (95, 99) and len(D.davis(root, "all")) == 194
    s = val[0]
    assert s.name == "bmx-trees/00000" and s.target.dtype == torch.int64
    assert s.image.shape == (3, 224, 392) and set(s.target.unique().tolist()) == {0, 1}
    assert D.auto_size(val, 14) == (224, 392)
    assert D.detect_task(root) == "fgbg" and D.open_dataset(root, "val").task == "fgbg"
    with pytest.raises(ValueError, match="split must be 'train', 'val' or 'all'"):
        D.davis(root, "test")
    with pytest.raises(ValueError, match="void_id do not apply to the DAVIS layout"):
        D.open_dataset(root, "val", void_id=3)


def test_folder_labels(tmp_path):
    labels = _write_folder(tmp_path, "train")
    _write_folder(tmp_path, "val", n=2)
    ds = D.open_dataset(tmp_path, "train")  # no classes.json: void 255, classes from train ids
    assert ds.task == "seg" and ds.ignore_index == 255 and ds.num_classes == 4
    assert torch.equal(ds[1].target, torch.from_numpy(labels[1].astype(np.int64)))
    assert ds[1].name == "img1" and ds[1].image.shape == (3, 12, 16)
    small = D.folder(tmp_path, "train", (6, 8), void_id=3, num_classes=3)
    assert small[0].target.shape == (6, 8) and small.ignore_index == 3
    assert torch.equal(small[0].target, torch.from_numpy(labels[0][1::2, 1::2].astype(np.int64)))
    (tmp_path / "classes.json").write_text(json.dumps({"classes": list("abcde"), "void_id": 9}))
    ds = D.folder(tmp_path, "val")
    assert ds.num_classes == 5 and ds.ignore_index == 9 and ds.class_names == list("abcde")
    assert len(D.subset(D.folder(tmp_path, "train"), 2)) == 2


def test_folder_depth(tmp_path):
    depth = _write_folder(tmp_path, "train", target="depth")
    ds = D.open_dataset(tmp_path, "train", task="depth", depth_scale=1000)
    assert ds.task == "depth" and ds.num_classes is None
    t = ds[2].target
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, torch.from_numpy(depth[2].astype(np.float32) / 1000))
    assert float(D.folder(tmp_path, "train", target="depth", depth_scale=10)[2].target.max()) \
        == pytest.approx(depth[2].max() / 10)


def test_folder_errors_name_the_file(tmp_path):
    _write_folder(tmp_path, "train")
    # a missing split names itself and the splits there are (folder() and open_dataset())
    for fn in (D.folder, D.open_dataset):
        with pytest.raises(FileNotFoundError, match=r"split 'val' not found in .*: its splits "
                                                    r"are train$"):
            fn(tmp_path, "val")
    (tmp_path / "train" / "depth").mkdir()  # an existing split: errors still name the file
    with pytest.raises(FileNotFoundError, match=r"train[/\\]depth[/\\]img0\.png missing"):
        D.folder(tmp_path, "train", target="depth")
    (tmp_path / "train" / "labels" / "img1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels[/\\]img1\.png missing for image .*img1\.png"):
        D.folder(tmp_path, "train", num_classes=4)
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(tmp_path / "train" / "labels" / "img1.png")
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(tmp_path / "train" / "labels" / "zzz.png")
    with pytest.raises(FileNotFoundError, match=r"zzz\.png has no image"):
        D.folder(tmp_path, "train", num_classes=4)
    (tmp_path / "train" / "labels" / "zzz.png").unlink()
    Image.fromarray(np.full((12, 16), 7, np.uint8)).save(tmp_path / "train" / "labels" / "img2.png")
    ds = D.folder(tmp_path, "train", num_classes=4, void_id=255)
    with pytest.raises(ValueError, match=r"img2\.png: label value 7 is neither a class id 0\.\.3 "
                                         r"nor the void id 255"):
        ds[2]
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(tmp_path / "train" / "labels" / "img2.png")
    with pytest.raises(ValueError, match=r"img2\.png: expected a single-channel PNG .* mode 'RGB'"):
        ds[2]
    with pytest.raises(ValueError, match="does not fit"):
        D.open_dataset(tmp_path, "train", task="depth")
    with pytest.raises(FileNotFoundError, match="unknown layout"):
        D.open_dataset(tmp_path / "train", "train")
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        D.folder(tmp_path, "train", size=(0, 5))
