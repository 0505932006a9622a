"""``eval_app`` (upfeat eval) end to end on tiny real subsets, and the report writers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from upfeat.checkpoint import save_checkpoint
from upfeat.eval import report
from upfeat.apps.eval_cli import eval_app
from upfeat import upsamplers

from ._utils import save_untrained_model, skip_without_focus

TINY = ["--size", "112", "154", "--max-iter", "30", "--no-progress"]


def _run(*args: str):
    return CliRunner().invoke(eval_app, list(args))


@pytest.fixture(scope="module")
def focus_ok():
    skip_without_focus()


def _resize_conv_ckpt(path):
    """A vits14_focus resize_conv checkpoint (random 1x1 conv) as ``upfeat train`` stores it."""
    up = upsamplers.create("resize_conv", 384, 14, kernel_size=1)
    with torch.no_grad():
        up.conv.weight.normal_(0, 0.02)
    meta = {"backbone": {"name": "vits14_focus", "kwargs": {}, "dim": 384, "stride": 14},
            "upsampler": up.config()}
    save_checkpoint(path, {f"upsampler.{k}": v for k, v in up.state_dict().items()}, meta)
    return path


def test_probe_camvid(data_dir, focus_ok, tmp_path):
    ckpt = _resize_conv_ckpt(tmp_path / "rc.safetensors")
    jbu = save_untrained_model(tmp_path / "jbu.safetensors")
    r = _run("probe", "--data", str(data_dir / "camvid"), "--upsampler",
             f"nearest,bilinear,resize_conv={ckpt},jbu={jbu},jbu=/no/such/ckpt.safetensors",
             "--out", str(tmp_path), "--max-train-images", "6", "--max-eval-images", "2",
             "--pixels-per-image", "300", "--show", "2", *TINY)
    assert r.exit_code == 0, r.output
    assert "`jbu=/no/such/ckpt.safetensors` skipped" in r.output
    for name in ("eval_seg_camvid_val.md", "eval_seg_camvid_val.json", "eval_seg_camvid_val.png",
                 "eval_seg_camvid_val_examples.png"):
        assert str(tmp_path / name) in r.output
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "eval_seg_camvid_val.json").read_text())
    # NAME=CHECKPOINT rows are labelled NAME, unless two rows share the name
    assert [row["label"] for row in data["rows"]] == ["nearest", "bilinear", "resize_conv",
                                                       f"jbu={jbu}"]
    assert data["rows"][2]["spec"] == f"resize_conv={ckpt}"
    assert data["meta"]["size (H, W)"] == [112, 154] and data["meta"]["train images"] == 6
    assert data["meta"]["cache"]["misses"] == 8  # backbone once per image for all four rows
    assert all(0 < row["metrics"]["miou"] < 1 and row["fit"]["train_pixels"] == 1800
               for row in data["rows"])
    for row in data["rows"]:  # boundary bands: fewer pixels than the image, d=3 inside d=8
        m = row["metrics"]
        assert 0 < m["pixels_d3"] < m["pixels_d8"] < m["pixels"], m
        assert 0 <= m["miou_d3"] <= 1 and 0 <= m["miou_d8"] <= 1
    assert "bilinear: mIoU (%) " in r.output and ", boundary mIoU d=3 (%) " in r.output
    md = (tmp_path / "eval_seg_camvid_val.md").read_text()
    assert "| `bilinear` |" in md and "Pedestrian" in md and "skipped" in md
    assert "| mIoU (%) | boundary mIoU d=3 (%) | boundary mIoU d=8 (%) | pixel acc (%) |" in md
    assert f"`resize_conv` = `resize_conv={ckpt}`" in md
    with Image.open(tmp_path / "eval_seg_camvid_val_examples.png") as im:
        assert im.size[0] > im.size[1]  # 5 columns (image + 4 rows) x 4 rows (2 images)


def test_depth_folder_end_to_end(focus_ok, tmp_path):
    """The NYU-v2 style layout (16-bit PNG, millimetres, 0 = invalid) runs through the CLI.

    Scenes: a dark textured wall at 1 m left of a random column, a bright one at 3 m right of it;
    a constant prediction has RMSE ~1 m, the probe must separate the two."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for sub in ("images", "depth"):
            (tmp_path / "d" / split / sub).mkdir(parents=True)
        for i in range(4):
            edge = int(rng.integers(28, 56))
            img = rng.integers(0, 80, (56, 84, 3), dtype=np.uint8)
            img[:, edge:] += 160
            mm = np.full((56, 84), 1000, np.uint16)
            mm[:, edge:] = 3000
            mm[:4] = 0  # invalid rows
            Image.fromarray(img).save(tmp_path / "d" / split / "images" / f"{i}.png")
            Image.fromarray(mm).save(tmp_path / "d" / split / "depth" / f"{i}.png")
    r = _run("probe", "--data", str(tmp_path / "d"), "--upsampler", "bilinear",
             "--out", str(tmp_path), "--size", "56", "84", "--max-iter", "50", "--no-progress")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "eval_depth_d_val.json").read_text())
    m = data["rows"][0]["metrics"]
    assert data["task"] == "depth" and data["meta"]["size (H, W)"] == [56, 84]
    assert m["pixels"] == 4 * 52 * 84  # invalid rows excluded
    assert m["rmse"] < 0.5 and m["delta1"] > 0.5, m  # a constant: RMSE ~1 m
    assert "RMSE (m)" in (tmp_path / "eval_depth_d_val.md").read_text()
    assert "miou_d3" not in m  # no boundary scores for depth
    assert (tmp_path / "eval_depth_d_val_examples.png").stat().st_size > 0


def test_mounted_as_upfeat_eval():
    from upfeat.apps.cli import app

    r = CliRunner().invoke(app, ["eval", "probe", "--help"])
    assert r.exit_code == 0 and "--upsampler" in r.output and "resize_conv=" in r.output


def test_probe_davis_detects_fgbg(data_dir, focus_ok, tmp_path):
    r = _run("probe", "--data", str(data_dir / "davis"), "--upsampler", "bilinear",
             "--out", str(tmp_path), "--max-train-images", "4", "--max-eval-images", "2",
             "--pixels-per-image", "300", "--size", "112", "196", "--max-iter", "30",
             "--weight-decay", "cv", "--no-progress")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "eval_fgbg_davis_val.json").read_text())
    m, meta = data["rows"][0]["metrics"], data["meta"]
    assert data["task"] == "fgbg" and 0 < m["fg_iou"] < 1
    scores = meta["weight decay CV (bilinear, train split)"]  # chosen: the best CV score
    assert len(scores) == 4 and scores[str(meta["weight decay"])] == max(scores.values())
    assert f"weight decay {meta['weight decay']:g} by cross-validation" in r.output
    assert 0 <= m["fg_iou_d3"] <= 1 and 0 < m["pixels_d3"] < m["pixels_d8"] < m["pixels"]


def test_cam_camvid(data_dir, focus_ok, tmp_path):
    r = _run("cam", "--data", str(data_dir / "camvid"), "--upsampler", "nearest,bilinear",
             "--out", str(tmp_path), "--max-train-images", "12", "--max-eval-images", "3", *TINY)
    assert r.exit_code == 0, r.output
    assert "presence classifier: val accuracy" in r.output
    data = json.loads((tmp_path / "eval_cam_camvid_val.json").read_text())
    for row in data["rows"]:
        m = row["metrics"]
        assert 0 <= m["avg_drop"] <= 100 and 0 <= m["avg_increase"] <= 100 and m["images"] == 3


@pytest.mark.parametrize("args,message", [
    (["--upsampler", "bilinar"], "Did you mean: bilinear"),
    (["--task", "depth"], "--task depth does not fit"),
    (["--size", "0", "10"], "size must be (height, width)"),
    (["--weight-decay", "lots"], "--weight-decay must be a number >= 0 or 'cv', got 'lots'"),
    (["--weight-decay", "-1"], "--weight-decay must be a number >= 0 or 'cv', got '-1'"),
    (["--split", "nosuch"], "split 'nosuch' not found in {data}: its splits are train, val"),
    (["--data", "{davis}", "--split", "nosuch"],
     "DAVIS split must be 'train', 'val' or 'all', got 'nosuch'"),
])
def test_probe_bad_input_is_one_line(data_dir, args, message):
    args = [a.format(davis=data_dir / "davis") for a in args]
    r = _run("probe", "--data", str(data_dir / "camvid"), "--no-progress", *args)
    message = message.format(data=data_dir / "camvid")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_scoring_on_train_warns_and_keeps_val_files(data_dir, focus_ok, tmp_path):
    val_json = tmp_path / "eval_seg_camvid_val.json"
    val_json.write_text("{}")  # a val run's result: a train-split run must not overwrite it
    r = _run("probe", "--data", str(data_dir / "camvid"), "--split", "train", "--upsampler",
             "bilinear", "--out", str(tmp_path), "--max-train-images", "3", "--max-eval-images",
             "2", "--pixels-per-image", "100", "--show", "1", *TINY)
    assert r.exit_code == 0, r.output
    assert "warning: scoring on 'train': 2 of its 2 eval images are in the 'train' split" in r.output
    assert val_json.read_text() == "{}"
    data = json.loads((tmp_path / "eval_seg_camvid_train.json").read_text())
    assert data["meta"]["split"] == "train" and "measure fit" in data["notes"][0]
    assert "measure fit, not generalisation" in (tmp_path / "eval_seg_camvid_train.md").read_text()


def test_missing_data_folder(tmp_path):
    r = _run("probe", "--data", str(tmp_path / "nope"))
    assert r.exit_code == 2 and f"data folder {tmp_path / 'nope'} not found" in r.output


def test_report_tables_and_colours(tmp_path):
    rows = [{"label": "a", "metrics": {"miou": 0.5, "miou_d3": 0.25, "miou_d8": 0.375,
                                       "pixel_acc": 0.75, "iou": [0.5, None]},
             "fit": {"train_pixels": 10, "iterations": 3}, "seconds": {"fit": 1.2, "eval": 0.4}},
            {"label": "b", "metrics": {"miou": float("nan"), "miou_d3": float("nan"),
                                       "pixel_acc": 0.8, "iou": [0.1, 0.9]}}]
    table = report.markdown_table(rows, "seg")
    assert "| `a` | 50.00 | 25.00 | 37.50 | 75.00 | 10 | 3 | 2 |" in table
    assert "| `b` | – | – | – | 80.00 |" in table  # NaN (no band pixel) and a missing key
    assert "| `a` | 50.0 | – |" in report.class_iou_table(rows, ["x", "y"])
    paths = report.write_results(tmp_path, "t", "seg", rows, {"title": "T"}, ["n1"], ["x", "y"])
    doc = json.loads(paths["json"].read_text())
    assert doc["rows"][0]["label"] == "a"
    assert doc["rows"][1]["metrics"]["miou"] is None  # NaN is not JSON: written as null
    assert "NaN" not in paths["json"].read_text()
    assert "- n1" in paths["md"].read_text() and paths["png"].stat().st_size > 0
    rgb = report.label_rgb(torch.tensor([[0, 11], [12, 3]]), ignore_index=11)
    assert rgb.shape == (3, 2, 2) and rgb[:, 0, 1].sum() == 0 and not math.isnan(float(rgb.sum()))
    assert torch.allclose(rgb[:, 0, 0], torch.tensor(report.PALETTE[0]) / 255)
