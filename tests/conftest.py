"""Shared fixtures: real data lives in ../shared/data beside the repository (as in CI)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture
def real_image(data_dir):
    """Return a function (H, W) -> (1, 3, H, W) float tensor in [0, 1] of a real DAVIS frame."""
    from PIL import Image

    def load(h: int, w: int, path: str = "davis/images/bmx-trees/00010.jpg") -> torch.Tensor:
        img = Image.open(data_dir / path).convert("RGB").resize((w, h), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]

    return load


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A private upfeat cache per test module: backbones convert once there, from scratch."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("upfeat_cache")
        mp.setenv("UPFEAT_CACHE", str(path))
        yield path
