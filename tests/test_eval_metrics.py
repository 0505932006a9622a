"""upfeat.eval.metrics against hand-computed examples."""
from __future__ import annotations

import math

import pytest
import torch

from upfeat._checks import ShapeError
from upfeat.eval.metrics import (DepthMeter, SegMeter, average_drop, average_increase,
                                 confusion_matrix, depth_scores, fgbg_scores, seg_scores)

# 8 pixels, 4 classes, void = 255. The two void pixels carry predictions 3 and 2: ignored.
TARGET = torch.tensor([0, 0, 1, 1, 2, 255, 255, 0])
PRED = torch.tensor([0, 1, 1, 1, 0, 3, 2, 0])


def test_confusion_matrix_ignores_void():
    conf = confusion_matrix(PRED, TARGET, 4, ignore_index=255)
    expected = torch.tensor([[2, 1, 0, 0],   # gt 0: two right, one predicted as 1
                             [0, 2, 0, 0],   # gt 1: both right
                             [1, 0, 0, 0],   # gt 2: predicted as 0
                             [0, 0, 0, 0]])  # gt 3: never (its prediction sits on void)
    assert torch.equal(conf, expected)


def test_miou_with_void_and_absent_class():
    s = seg_scores(confusion_matrix(PRED, TARGET, 4, ignore_index=255))
    # IoU0 = 2 / (2 + 1 FN + 1 FP) = 0.5, IoU1 = 2 / (2 + 1 FP) = 2/3, IoU2 = 0 / 1 = 0,
    # class 3 absent from GT and (non-void) predictions -> excluded.
    assert s["iou"][:3] == pytest.approx([0.5, 2 / 3, 0.0]) and s["iou"][3] is None
    assert s["miou"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 6)
    assert s["pixels"] == 6


def test_class_only_in_prediction_counts_as_zero():
    pred = PRED.clone()
    pred[4] = 3  # the gt-2 pixel is now predicted as class 3, absent from the GT
    s = seg_scores(confusion_matrix(pred, TARGET, 4, ignore_index=255))
    # IoU0 = 2/3 (no FP any more), IoU1 = 2/3, IoU2 = 0/1, IoU3 = 0/1 -> all four averaged
    assert s["iou"] == pytest.approx([2 / 3, 2 / 3, 0.0, 0.0])
    assert s["miou"] == pytest.approx(1 / 3)


def test_seg_meter_accumulates_batches():
    m = SegMeter(4, 255)
    m.update(PRED[:4].view(2, 2), TARGET[:4].view(2, 2))
    m.update(PRED[4:].view(2, 2), TARGET[4:].view(2, 2))
    assert m.compute()["miou"] == pytest.approx((0.5 + 2 / 3) / 3)


def test_fgbg_iou():
    gt = torch.tensor([[0, 1, 1], [0, 1, 0]])
    pred = torch.tensor([[1, 1, 1], [0, 0, 0]])
    s = fgbg_scores(confusion_matrix(pred, gt, 2))
    # fg: TP 2, FP 1, FN 1 -> 0.5; bg: TP 2, FP 1, FN 1 -> 0.5
    assert s["fg_iou"] == pytest.approx(0.5) and s["miou"] == pytest.approx(0.5)
    assert s["pixel_acc"] == pytest.approx(4 / 6)
    with pytest.raises(ShapeError, match="2 x 2"):
        fgbg_scores(torch.zeros(3, 3, dtype=torch.int64))


def test_confusion_matrix_errors():
    with pytest.raises(ShapeError, match=r"pred shape \(3,\) != target shape \(2,\)"):
        confusion_matrix(torch.zeros(3), torch.zeros(2), 2)
    with pytest.raises(ValueError, match="target holds class id 7 outside 0..3"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 4, ignore_index=255)
    with pytest.raises(ValueError, match="pred holds class id 4"):
        confusion_matrix(torch.tensor([0, 4]), torch.tensor([0, 1]), 4)


def test_depth_rmse_and_delta():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.8, 1.0])
    gt = torch.tensor([1.0, 2.5, 0.0, 4.0, float("nan")])  # 0 and NaN are invalid
    s = depth_scores(pred, gt)
    # errors 0, -0.5, 0.8 -> RMSE sqrt(0.89 / 3); ratios 1, 1.25 (not < 1.25), 1.2
    assert s["rmse"] == pytest.approx(math.sqrt((0.25 + 0.64) / 3))
    assert s["delta1"] == pytest.approx(2 / 3)
    assert s["pixels"] == 3


def test_depth_meter_pools_pixels():
    m = DepthMeter()
    m.update(torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 2.0]]))  # errors 1, 0
    m.update(torch.tensor([[3.0]]), torch.tensor([[1.0]]))              # error 2
    s = m.compute()
    assert s["rmse"] == pytest.approx(math.sqrt(5 / 3)) and s["delta1"] == pytest.approx(1 / 3)
    assert math.isnan(DepthMeter().compute()["rmse"])
    with pytest.raises(ValueError, match="non-finite"):
        m.update(torch.tensor([float("inf")]), torch.tensor([1.0]))


def test_average_drop_and_increase():
    y = torch.tensor([0.8, 0.5, 0.4])
    o = torch.tensor([0.4, 0.6, 0.3])
    # drops: 0.4/0.8 = 50 %, 0 (score went up), 0.1/0.4 = 25 % -> mean 25 %
    assert average_drop(y, o) == pytest.approx(25.0)
    assert average_increase(y, o) == pytest.approx(100 / 3)  # only image 2 increased
    assert average_increase(y, y) == 0.0 and average_drop(y, y) == 0.0


def test_cam_metric_errors():
    with pytest.raises(ValueError, match="must be > 0"):
        average_drop(torch.tensor([0.5, 0.0]), torch.tensor([0.1, 0.1]))
    with pytest.raises(ShapeError, match="1-D"):
        average_increase(torch.ones(2, 2), torch.ones(2, 2))
