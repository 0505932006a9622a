"""benchmarks/eval_table.py: the combined README table, the sanity check, and (slow) a tiny run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._utils import load_benchmark, save_untrained_model, skip_without_focus

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_table.py"


def _script():
    return load_benchmark("eval_table")


def _row(label, **metrics):
    return {"label": label, "metrics": metrics, "seconds": {"fit": 1.0, "eval": 2.4}}


def test_combined_table_and_sanity_check():
    m = _script()
    nan = float("nan")
    results = {"camvid": {"rows": [_row("nearest", miou=0.4, miou_d3=0.2, miou_d8=0.3,
                                        pixel_acc=0.8),
                                   _row("bilinear", miou=0.45, miou_d3=0.25, miou_d8=0.35,
                                        pixel_acc=0.85)]},
               "davis": {"rows": [_row("nearest", fg_iou=0.6, fg_iou_d3=nan, fg_iou_d8=0.5),
                                  _row("bilinear", fg_iou=0.55, fg_iou_d3=0.3, fg_iou_d8=0.5),
                                  _row("jbu", fg_iou=0.7, fg_iou_d3=0.4, fg_iou_d8=0.6)]}}
    table = m.combined_table(results).splitlines()
    assert table[0] == ("| upsampler | CamVid mIoU (%) | CamVid boundary mIoU d=3 (%) "
                        "| CamVid boundary mIoU d=8 (%) | CamVid pixel acc (%) | DAVIS fg IoU (%) "
                        "| DAVIS boundary fg IoU d=3 (%) | DAVIS boundary fg IoU d=8 (%) "
                        "| camvid time (s) | davis time (s) |")
    # a NaN score (no boundary pixel) is "–", not a crash
    assert table[2] == "| `nearest` | 40.00 | 20.00 | 30.00 | 80.00 | 60.00 | – | 50.00 | 3 | 3 |"
    # a row missing on one dataset
    assert table[4] == "| `jbu` | – | – | – | – | 70.00 | 40.00 | 60.00 | – | 3 |"
    assert m.sanity(results) == ["davis: bilinear fg_iou 0.5500 <= nearest 0.6000"]


@pytest.mark.slow
def test_tiny_run_end_to_end(data_dir, tmp_path):
    """The README command on a few images, training its resize_conv (2 steps) on the way."""
    skip_without_focus()
    jbu = save_untrained_model(tmp_path / "jbu.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--camvid-train", "4", "--camvid-eval", "2",
                        "--davis-train", "3", "--davis-eval", "2", "--max-iter", "20",
                        "--resize-conv", str(tmp_path / "rc"), "--resize-conv-steps", "2",
                        "--jbu", str(jbu), "--out", str(tmp_path / "out"), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode in (0, 1), r.stderr  # 1: bilinear <= nearest, possible on 2 images
    assert (tmp_path / "rc" / "model.safetensors").is_file()
    data = json.loads((tmp_path / "out" / "eval_table.json").read_text())
    for name in ("camvid", "davis"):
        labels = [row["label"] for row in data["results"][name]["rows"]]
        assert labels == ["nearest", "bilinear", "bicubic", "resize_conv", "large_image",
                          "upsample_anything", "jbu"]
    assert "train resize_conv" in data["seconds"]
    for name, key in (("camvid", "miou_d3"), ("davis", "fg_iou_d8")):
        assert all(0 <= row["metrics"][key] <= 1 for row in data["results"][name]["rows"])
    for f in ("eval_seg_camvid_val.png", "eval_fgbg_davis_val_examples.png", "eval_table.md"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert [data["results"][k]["meta"]["weight decay"] for k in ("camvid", "davis")] == [1e-4, 0.1]
    # DAVIS again with a cross-validated weight decay, CamVid's results kept (and said so)
    r = subprocess.run([sys.executable, str(SCRIPT), "--datasets", "davis", "--merge",
                        "--weight-decay", "cv", "--rows", "bilinear", "--davis-train", "3",
                        "--davis-eval", "2", "--max-iter", "20", "--out", str(tmp_path / "out"),
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    merged = json.loads((tmp_path / "out" / "eval_table.json").read_text())
    assert merged["results"]["camvid"] == data["results"]["camvid"]
    meta = merged["results"]["davis"]["meta"]
    assert meta["weight decay"] in (1e-4, 1e-3, 1e-2, 0.1)
    assert len(meta["weight decay CV (bilinear, train split)"]) == 4
    md = (tmp_path / "out" / "eval_table.md").read_text()
    assert "camvid: kept from the earlier run" in md and "weight decay camvid" in md
