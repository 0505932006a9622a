"""upfeat.eval.cam: CAMs, presence targets and A.D. / A.I. on hand-built cases."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upfeat.backbones import wrap
from upfeat.eval.cam import PresenceClassifier, cam_faithfulness, presence_targets

# Backbone: 4 x 4 average of the raw RGB values (stride 4, dim 3): feature = colour.
BACKBONE = wrap(nn.AvgPool2d(4), stride=4, dim=3, mean=(0, 0, 0), std=(1, 1, 1))


def nearest(image: torch.Tensor) -> torch.Tensor:
    return F.interpolate(BACKBONE(image), size=image.shape[-2:], mode="nearest")


def _dataset(image: torch.Tensor) -> list:
    return [SimpleNamespace(image=image, target=None, name="x")]


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_cam_is_min_max_normalised():
    clf = PresenceClassifier(torch.tensor([[1.0, -2.0]]), torch.zeros(1))
    feats = torch.randn(2, 2, 5, 6)
    cam = clf.cam(feats, torch.tensor([0, 0]))
    assert cam.shape == (2, 5, 6)
    assert torch.allclose(cam.amin((1, 2)), torch.zeros(2)) and torch.allclose(cam.amax((1, 2)), torch.ones(2))
    raw = feats[:, 0] - 2 * feats[:, 1]
    assert torch.equal(cam.flatten(1).argmax(1), raw.flatten(1).argmax(1))
    assert torch.equal(clf.cam(torch.ones(1, 2, 3, 3), torch.tensor([0])), torch.zeros(1, 3, 3))


def test_presence_targets():
    lab = torch.tensor([[0, 0, 0, 1], [0, 0, 2, 5], [5, 5, 5, 5]])  # 5 = void, 7 non-void pixels
    assert presence_targets(lab, 4, 5).tolist() == [1, 1, 1, 0]
    assert presence_targets(lab, 4, 5, min_fraction=0.2).tolist() == [1, 0, 0, 0]  # 1/7 < 0.2


def test_faithful_cam_keeps_the_score():
    """The CAM is exactly the red square the class is scored on: masking changes nothing."""
    clf = PresenceClassifier(torch.tensor([[10.0, 0, 0], [0, 10.0, 0]]), torch.tensor([-1.0, -1.0]))
    img = torch.zeros(1, 3, 16, 16)
    img[:, 0, :8, :8] = 1  # red quarter: mean red 0.25 -> logit 1.5 (class 0 on top)
    m = cam_faithfulness(clf, BACKBONE, nearest, _dataset(img[0]))
    assert m["full_score"] == pytest.approx(_sig(1.5))
    assert m["avg_drop"] == pytest.approx(0.0, abs=1e-9) and m["avg_increase"] == 0.0
    # An inverted CAM masks out exactly the evidence: score falls to sigmoid(-1).
    m = cam_faithfulness(clf, BACKBONE, lambda x: 1 - nearest(x), _dataset(img[0]))
    assert m["masked_score"] == pytest.approx(_sig(-1.0))
    assert m["avg_drop"] == pytest.approx((_sig(1.5) - _sig(-1.0)) / _sig(1.5) * 100)
    assert m["avg_increase"] == 0.0


def test_cam_removing_negative_evidence_increases_the_score():
    # class 0: red is evidence for, green against; class 1 (blue) stays below class 0
    clf = PresenceClassifier(torch.tensor([[10.0, -10.0, 0], [0, 0, 10.0]]), torch.tensor([-1.0, -5.0]))
    img = torch.zeros(1, 3, 16, 16)
    img[:, 0, :8, :8] = 1
    img[:, 1, 8:, 8:] = 1  # logit0 = 2.5 - 2.5 - 1 = -1
    m = cam_faithfulness(clf, BACKBONE, nearest, _dataset(img[0]))
    # CAM: red 1, black 0.5, green 0 -> green removed, red kept -> logit0 = 1.5
    assert m["full_score"] == pytest.approx(_sig(-1.0))
    assert m["masked_score"] == pytest.approx(_sig(1.5))
    assert m["avg_increase"] == 100.0 and m["avg_drop"] == 0.0


def test_top_class_only_among_candidates():
    clf = PresenceClassifier(torch.eye(3), torch.zeros(3), candidates=torch.tensor([False, True, True]))
    logits = torch.tensor([[9.0, 1.0, 2.0], [9.0, 3.0, 2.0]])
    assert clf.top_class(logits).tolist() == [2, 1]  # class 0 always scores highest: not a candidate
