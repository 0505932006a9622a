"""upfeat.eval.cache: LRU on bytes, disk round trip, one backbone run per (image, size)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from upfeat.backbones import wrap
from upfeat.eval.cache import CachedBackbone, FeatureCache, image_key


class Counting(nn.Module):
    """A stride-4 conv backbone that counts the images it has seen."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.conv(x)


def _backbone() -> tuple[nn.Module, Counting]:
    net = Counting()
    return wrap(net, stride=4, dim=8, name="counting"), net


def test_lru_evicts_by_bytes():
    cache = FeatureCache(memory_mb=1000 / 2 ** 20)  # 1000 bytes: two 400-byte tensors fit
    a, b, c = (torch.full((100,), float(i)) for i in range(3))  # 400 bytes each
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", c)                   # evicts "b", the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes == 800 and len(cache) == 2
    cache.put("big", torch.zeros(1000))  # larger than the whole budget: not kept in memory
    assert "big" not in cache and cache.nbytes == 800
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get("b") is None and cache.misses == 1
    with pytest.raises(ValueError, match="memory_mb must be >= 0"):
        FeatureCache(-1)


def test_backbone_runs_once_per_image_and_size():
    bb, net = _backbone()
    cached = CachedBackbone(bb, FeatureCache())
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(3, 3, 16, 20, generator=g)
    first = cached(imgs[:2])
    assert net.images == 2 and first.shape == (2, 8, 4, 5)
    both = cached(imgs)              # only the third image is new
    assert net.images == 3
    torch.testing.assert_close(both[:2], first)
    cached(imgs[2:])                 # all cached
    assert net.images == 3
    with torch.no_grad():
        torch.testing.assert_close(both, bb(imgs))
    net.images = 3
    cached(imgs[:1, :, :12])         # another size is another entry
    assert net.images == 4
    imgs2 = imgs.clone()
    imgs2[0, 0, 0, 0] += 1e-3        # any pixel change is a new entry
    cached(imgs2[:1])
    assert net.images == 5
    assert image_key(imgs[0]) != image_key(imgs2[0])
    # features are normal tensors (not inference tensors): autograd code may use them
    (cached(imgs[:1]) * torch.ones(1, requires_grad=True)).sum().backward()


def test_disk_cache_survives_the_process(tmp_path):
    img = torch.rand(1, 3, 16, 16)
    bb, net = _backbone()
    ref = CachedBackbone(bb, FeatureCache(disk_dir=tmp_path))(img)
    files = list(tmp_path.glob("*.safetensors"))
    assert net.images == 1 and len(files) == 1
    again = CachedBackbone(bb, FeatureCache(disk_dir=tmp_path))  # fresh memory, same folder
    torch.testing.assert_close(again(img), ref)
    assert net.images == 1 and again.cache.disk_hits == 1
    # different weights -> different key, the old file is not used
    original = {k: v.clone() for k, v in bb.state_dict().items()}
    with torch.no_grad():
        bb.module.conv.weight.add_(1.0)
    CachedBackbone(bb, FeatureCache(disk_dir=tmp_path))(img)
    assert net.images == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2
    # a torn file is recomputed with a warning, not trusted
    files[0].write_bytes(b"not a safetensors file")
    bb.load_state_dict(original)
    with pytest.warns(UserWarning, match="unreadable cache file"):
        out = CachedBackbone(bb, FeatureCache(disk_dir=tmp_path))(img)
    torch.testing.assert_close(out, ref)
    assert net.images == 3


def test_fingerprint_covers_scalar_buffers():
    """BatchNorm's 0-dim ``num_batches_tracked`` (int64) once crashed the fingerprint of every CNN."""
    from upfeat.checkpoint import weights_fingerprint
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = weights_fingerprint(net)
    assert before == weights_fingerprint(net)
    net[1].num_batches_tracked += 1
    assert weights_fingerprint(net) != before
