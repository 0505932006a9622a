"""The pool of jittered views of one image and their backbone features (computed once)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...jitter import View, warp_thetas
from .features import FeaturePCA

BACKBONE_BATCH = 16  # views per backbone call while building the pool


@torch.no_grad()
def view_pool(image: torch.Tensor, backbone: torch.nn.Module, views: list[View],
              pca_views: int, k: int, pca: FeaturePCA | None = None,
              progress: bool = False, bf16: bool = False
              ) -> tuple[FeaturePCA, torch.Tensor, torch.Tensor]:
    """Backbone features of every view, as PCA codes.

    Returns ``(pca, thetas (P, 2, 3), codes (P, k, h, w))``; the PCA is fitted on the first
    ``pca_views`` views unless given. Only codes are kept, so memory is ``k / C`` of the features.
    ``bf16``: run the backbone under bfloat16 autocast (features returned as float32).
    """
    dev = image.device
    thetas = torch.stack([v.theta(dtype=torch.float32) for v in views]).to(dev)
    first = min(len(views), max(pca_views, 1))
    chunks, feats = [], []
    bar = tqdm(total=len(views), desc="backbone views", disable=not progress, leave=False)
    for i in range(0, len(views), BACKBONE_BATCH):
        x = warp_thetas(image, thetas[i:i + BACKBONE_BATCH]).clamp_(0, 1)
        with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            f = backbone(x).float()
        bar.update(f.shape[0])
        if pca is None:  # keep full features until the PCA views are in, then encode
            feats.append(f)
            if sum(t.shape[0] for t in feats) >= first:
                allf = torch.cat(feats)
                pca = FeaturePCA.fit(allf[:first], k).to(dev)
                chunks.append(pca.encode(allf))
                feats = []
        else:
            chunks.append(pca.encode(f))
    bar.close()
    assert pca is not None
    return pca, thetas, torch.cat(chunks)
