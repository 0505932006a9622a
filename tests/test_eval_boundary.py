"""Boundary (trimap) scores: ``boundary_band`` and ``SegMeter(bands=...)`` on hand-made maps."""
from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from upfeat._checks import ShapeError
from upfeat.eval import metrics
from upfeat.eval.metrics import SegMeter, boundary_band


def _edge(h: int = 10, w: int = 20, col: int = 10) -> torch.Tensor:
    """(h, w) label map: class 0 left of ``col``, class 1 from ``col`` on (a vertical edge)."""
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[:, col:] = 1
    return lab


@pytest.mark.parametrize("d", [1, 3, 8])
def test_vertical_edge_band_is_2d_columns(d):
    band = boundary_band(_edge(), d)
    cols = band.all(0).nonzero()[:, 0].tolist()
    assert cols == list(range(10 - d, 10 + d))  # d columns each side of the edge
    assert torch.equal(band.any(0), band.all(0))  # whole columns, the image border adds nothing


def test_chebyshev_distance_at_a_corner():
    lab = torch.zeros(9, 9, dtype=torch.long)
    lab[4, 4] = 1  # one pixel of class 1: its band is the 3 x 3 square at d = 1 (not a cross)
    band = boundary_band(lab, 1)
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[3:6, 3:6] = True
    assert torch.equal(band, expected)
    assert int(boundary_band(lab, 2).sum()) == 25


def test_d_larger_than_the_image():
    lab = _edge(3, 4, 2)
    assert boundary_band(lab, 8).all()  # every pixel is within 8 px of the edge
    assert not boundary_band(torch.zeros(1, 1, dtype=torch.long), 8).any()


@pytest.mark.parametrize("d", [1, 3, 8])
def test_matches_square_max_pool_reference(d):
    """Random blocky maps with void (id 4): the band equals max-pool(ids) > min-pool(ids) over
    the non-void pixels of a (2d+1)^2 window, computed independently with ``max_pool2d``."""
    lab = (torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(d)) * 5).long()
    lab = lab.repeat_interleave(19, 1).repeat_interleave(19, 2)[:, :-3, :-5]  # 19 px blocks
    void = lab == 4
    hi = F.max_pool2d(torch.where(void, -1.0, lab.float())[:, None], 2 * d + 1, 1, d)
    neg_lo = F.max_pool2d(torch.where(void, -99.0, -lab.float())[:, None], 2 * d + 1, 1, d)
    expected = ~void & (hi + neg_lo > 0)[:, 0]
    assert torch.equal(boundary_band(lab, d, void_id=4), expected)
    assert 0 < int(expected.sum()) < int((~void).sum())


def test_void_neither_makes_boundaries_nor_is_scored():
    lab = torch.zeros(4, 12, dtype=torch.long)
    lab[:, 4:6] = 9   # a void strip, 2 wide, between class 0 (cols 0-3) ...
    lab[:, 6:] = 1    # ... and class 1 (cols 6-11)
    # d = 2: the nearest class-1 pixel is 3 columns from column 3 -> no band at all
    assert not boundary_band(lab, 2, void_id=9).any()
    # d = 3: only columns 3 and 6 see each other across the void; the void itself stays out
    assert boundary_band(lab, 3, void_id=9).all(0).nonzero()[:, 0].tolist() == [3, 6]
    assert boundary_band(lab, 5, void_id=9).all(0).nonzero()[:, 0].tolist() == [1, 2, 3, 6, 7, 8]
    # without a void id, 9 is just another class: its edges with 0 and 1 form the band
    assert boundary_band(lab, 1)[:, 3:7].all()


def test_batch_images_do_not_see_each_other():
    a, b = _edge(), torch.ones(10, 20, dtype=torch.long)  # b: a single class, no boundary
    band = boundary_band(torch.stack([a, b]), 3)
    assert torch.equal(band[0], boundary_band(a, 3)) and not band[1].any()


def test_band_errors():
    with pytest.raises(TypeError, match="integer class ids"):
        boundary_band(torch.zeros(4, 4), 3)
    with pytest.raises(ShapeError, match=r"\(H, W\) or \(B, H, W\)"):
        boundary_band(torch.zeros(1, 1, 4, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="d must be an int >= 1"):
        boundary_band(_edge(), 0)


def _meter(pred: torch.Tensor, target: torch.Tensor, **kw) -> dict:
    m = SegMeter(2, bands=(3, 8), **kw)
    m.update(pred, target)
    return m.compute()


def test_wrong_far_from_edge_only_hurts_full_miou():
    gt = _edge(10, 40, 20)  # band d=3: columns 17-22
    pred = gt.clone()
    pred[:, :5] = 1  # class-0 columns 0-4 predicted 1: more than 8 px from the edge
    s = _meter(pred, gt)
    assert s["miou_d3"] == 1.0 and s["miou_d8"] == 1.0 and s["pixels_d3"] == 60
    # full: IoU0 = 150 / 200, IoU1 = 200 / 250
    assert s["miou"] == pytest.approx((0.75 + 0.8) / 2)


def test_wrong_on_the_edge_hurts_the_band_more():
    gt = _edge(10, 40, 20)
    pred = gt.clone()
    pred[:, 18:20] = 1  # the two class-0 columns next to the edge
    s = _meter(pred, gt)
    # d=3 band: cols 17-22, 60 px: gt0 30 (10 right, 20 wrong), gt1 30 right
    assert s["miou_d3"] == pytest.approx((10 / 30 + 30 / 50) / 2)
    # d=8 band: cols 12-27: gt0 80 (60 right), gt1 80 right
    assert s["miou_d8"] == pytest.approx((60 / 80 + 80 / 100) / 2)
    assert s["miou"] == pytest.approx((180 / 200 + 200 / 220) / 2)
    assert s["miou_d3"] < s["miou_d8"] < s["miou"]


def test_band_confusion_by_hand():
    gt = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 0],
                         [2, 0, 1, 1],
                         [2, 0, 2, 2]])
    # d = 1 band: every pixel except (0,0) (its 3 x 3 window holds only 0s) and (0,3) (only 1s)
    band = boundary_band(gt, 1)
    assert band.logical_not().nonzero().tolist() == [[0, 0], [0, 3]]
    m = SegMeter(3, bands=(1,))
    m.update(pred, gt)
    # band pixels (gt -> pred): (0,1) 0->1, (0,2) 1->1, (1,0) 0->2, (1,1) 0->0, (1,2) 1->1,
    # (1,3) 1->1, row 2: 2->2, 2->0, 2->2, 2->2
    assert torch.equal(m.band_conf[1], torch.tensor([[1, 1, 1], [0, 3, 0], [1, 0, 3]]))
    s = m.compute()
    assert s["iou_d1"] == pytest.approx([1 / 4, 3 / 4, 3 / 5]) and s["pixels_d1"] == 10
    assert s["pixel_acc_d1"] == pytest.approx(7 / 10)


def test_void_pixels_are_not_scored_in_the_band():
    gt = torch.tensor([[0, 0, 5, 1, 1]])  # void 5 between the classes: d = 2 reaches across
    pred = torch.tensor([[0, 0, 0, 0, 1]])
    m = SegMeter(2, ignore_index=5, bands=(2,))
    m.update(pred, gt)
    # band: cols 1 (0 -> 0) and 3 (1 -> 0); cols 0 and 4 are 3 px from the other class, and
    # the void col 2 is out (its prediction 0 is no false positive)
    assert torch.equal(m.band_conf[2], torch.tensor([[1, 0], [1, 0]]))


def test_images_without_boundary_add_nothing_and_no_band_is_nan():
    flat = torch.zeros(1, 6, 6, dtype=torch.long)
    s = _meter(torch.ones_like(flat), flat)  # all wrong, but no boundary anywhere
    assert s["pixels_d3"] == 0 and math.isnan(s["miou_d3"]) and s["miou"] == 0.0
    gt = torch.stack([_edge(6, 12, 6), torch.zeros(6, 12, dtype=torch.long)])
    pred = gt.clone()
    pred[1] = 1  # the second image, without a boundary, is entirely wrong
    s = _meter(pred, gt)
    assert s["miou_d3"] == 1.0 and s["pixels_d3"] == 36 and s["miou"] < 0.5
    fg = _meter(torch.ones_like(flat), flat, fgbg=True)
    assert math.isnan(fg["fg_iou_d3"]) and math.isnan(fg["fg_iou_d8"])


def test_per_image_updates_equal_one_batch():
    gen = torch.Generator().manual_seed(0)
    gt = (torch.rand(3, 16, 16, generator=gen) * 3).long()
    pred = (torch.rand(3, 16, 16, generator=gen) * 3).long()
    one, many = SegMeter(3, bands=(3,)), SegMeter(3, bands=(3,))
    one.update(pred, gt)
    for p, t in zip(pred, gt):
        many.update(p, t)
    assert torch.equal(one.band_conf[3], many.band_conf[3]) and one.band_conf[3].sum() > 0


def test_docstring_examples():
    assert doctest.testmod(metrics, raise_on_error=False).failed == 0
