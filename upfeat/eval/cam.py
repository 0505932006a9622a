"""CAM faithfulness of upsampled features (FeatUp's A.D. / A.I. experiment, on CamVid).

1. Classifier: a multi-label "class present" linear map on mean-pooled low-res backbone features,
   ``logit_k = <W_k, mean_pixels f(x)> + b_k``; class ``k`` is present in an image when it covers
   at least ``min_fraction`` of its non-void pixels. Fitted on the train split (L-BFGS, BCE, train
   standardisation folded into ``W``); the score of a class is ``sigmoid(logit)`` in (0, 1).
2. CAM of the top class ``c`` of each val image: the highest-scoring *candidate* class on the full
   image. Candidates are the classes present in at most ``max_rate`` (90 %) of the train images:
   on CamVid, Sky, Road and Building are in 96-100 % of them, so the classifier is sure of them
   whatever the pixels (scores ~0.99998) and their A.D. would be ~0 for any CAM. The CAM is the
   class-weighted features ``cam(p) = <W_c, F(p)>`` with ``F`` the features of one upsampler at
   full resolution (``nearest`` = the low-res CAM, blocky), min-max normalised to [0, 1] per image.
3. Rescore: ``o_c`` = score of the masked image ``image * cam``; ``y_c`` = full-image score.
   Average Drop / Average Increase from :mod:`upfeat.eval.metrics`. Because the CAM is linear in the
   features, ``nearest`` and ``bilinear`` CAMs equal the low-res CAM resized the same way.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import ShapeError
from .datasets import PixelDataset
from .metrics import average_drop, average_increase
from .linear import lbfgs_linear

Features = Callable[[torch.Tensor], torch.Tensor]


class PresenceClassifier(nn.Module):
    """Multi-label linear classifier on mean-pooled features: (B, C, h, w) -> logits (B, K)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor,
                 candidates: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())  # (K, C)
        self.register_buffer("bias", bias.detach().float().clone())  # (K,)
        cand = torch.ones(len(bias), dtype=torch.bool) if candidates is None else candidates.bool()
        self.register_buffer("candidates", cand.clone())  # (K,) classes a CAM may explain

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim != 4 or feats.shape[1] != self.weight.shape[1]:
            raise ShapeError(f"classifier expects feats (B, {self.weight.shape[1]}, h, w), got "
                             f"{tuple(feats.shape)}")
        return feats.float().mean((2, 3)) @ self.weight.T + self.bias

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, K) in (0, 1)."""
        return torch.sigmoid(self(feats))

    def top_class(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K) logits -> (B,) the highest-scoring candidate class."""
        return logits.masked_fill(~self.candidates, float("-inf")).argmax(1)

    def cam(self, feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) features, (B,) class ids -> (B, H, W) CAMs min-max normalised to [0, 1]."""
        cam = torch.einsum("bchw,bc->bhw", feats.float(), self.weight[classes])
        lo = cam.amin((1, 2), keepdim=True)
        hi = cam.amax((1, 2), keepdim=True)
        return (cam - lo) / (hi - lo).clamp_min(1e-12)


def presence_targets(label: torch.Tensor, num_classes: int, ignore_index: int | None,
                     min_fraction: float = 0.01) -> torch.Tensor:
    """(H, W) labels -> (K,) float {0, 1}: classes covering >= ``min_fraction`` of non-void pixels."""
    lab = label.reshape(-1)
    if ignore_index is not None:
        lab = lab[lab != ignore_index]
    counts = torch.bincount(lab, minlength=num_classes)[:num_classes].float()
    return (counts >= min_fraction * max(1, lab.numel())).float() * (counts > 0).float()


@torch.no_grad()
def _pooled(backbone: Features, dataset: PixelDataset, min_fraction: float, progress: bool,
            desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for s in tqdm(dataset, desc=desc, disable=not progress, leave=False, unit="img"):
        xs.append(backbone(s.image[None]).float().mean((2, 3))[0].cpu())
        ys.append(presence_targets(s.target, dataset.num_classes, dataset.ignore_index, min_fraction))
    return torch.stack(xs), torch.stack(ys)


def fit_presence(backbone: Features, train: PixelDataset, max_iter: int = 300,
                 weight_decay: float = 1e-2, min_fraction: float = 0.01, max_rate: float = 0.9,
                 progress: bool = False) -> tuple[PresenceClassifier, dict]:
    """Fit the presence classifier on ``train`` (a segmentation dataset); ``backbone`` gives
    low-res features (B, C, h, w). Candidate classes: present in 0 < rate <= ``max_rate`` of the
    train images (all classes if none). Returns it and ``{"images", "candidates", "iterations",
    "evals", "loss"}``."""
    if train.task != "seg":
        raise ValueError(f"CAM faithfulness needs a segmentation dataset, got task {train.task!r}")
    x, y = _pooled(backbone, train, min_fraction, progress, "CAM classifier: train features")
    std, mean = torch.std_mean(x, 0)
    std = std.clamp_min(1e-6)
    prior = y.mean(0).clamp(1e-3, 1 - 1e-3)
    w, b, info = lbfgs_linear((x - mean) / std, y, "bce", (prior / (1 - prior)).log(), max_iter,
                              weight_decay)
    w = w / std
    rate = y.mean(0)
    cand = (rate > 0) & (rate <= max_rate)
    cand = cand if cand.any() else torch.ones_like(cand)
    names = [train.class_names[k] if k < len(train.class_names) else str(k)
             for k in cand.nonzero()[:, 0].tolist()]
    return PresenceClassifier(w, b - w @ mean, cand), {"images": len(train), "candidates": names, **info}


@torch.no_grad()
def presence_accuracy(clf: PresenceClassifier, backbone: Features, dataset: PixelDataset,
                      min_fraction: float = 0.01, progress: bool = False) -> dict:
    """``accuracy`` of all present/absent decisions and ``top1_present`` (the top candidate class,
    the one a CAM explains, is present)."""
    x, y = _pooled(backbone, dataset, min_fraction, progress, "CAM classifier: val features")
    logits = x @ clf.weight.T + clf.bias
    top = clf.top_class(logits)
    return {"accuracy": float(((logits > 0).float() == y).float().mean()),
            "top1_present": float(y[torch.arange(len(y)), top].mean())}


@torch.no_grad()
def cam_faithfulness(clf: PresenceClassifier, backbone: Features, features: Features,
                     dataset: PixelDataset, masked_backbone: Features | None = None,
                     progress: bool = False, desc: str = "CAM") -> dict:
    """A.D. / A.I. of the CAMs made from ``features`` (B, C, H, W) over ``dataset``.

    ``backbone`` gives the low-res features of the full images (may be cached);
    ``masked_backbone`` those of the masked images (default ``backbone``; pass the raw backbone
    so one-off masked images do not fill a feature cache). Returns ``{"avg_drop",
    "avg_increase", "images", "full_score", "masked_score"}`` (the last two are means).
    """
    full, masked = [], []
    for s in tqdm(dataset, desc=desc, disable=not progress, leave=False, unit="img"):
        img = s.image[None]
        logits = clf(backbone(img))
        y, c = torch.sigmoid(logits)[0], clf.top_class(logits)
        cam = clf.cam(features(img), c)  # (1, H, W)
        o = clf.scores((masked_backbone or backbone)(img * cam[:, None]))[0]
        full.append(y[c])
        masked.append(o[c])
    y, o = torch.cat(full), torch.cat(masked)
    return {"avg_drop": average_drop(y, o), "avg_increase": average_increase(y, o),
            "images": len(y), "full_score": float(y.mean()), "masked_score": float(o.mean())}
