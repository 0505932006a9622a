"""The memory of one streamed JBU tile: measured peak RSS vs the planner's estimate, and the
channel-group streaming (sink, uint8 windows, preview) that makes it small, on real photos."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upfeat.inference.featfile import (FeatureWriter, _safetensors_header, read_features,
                                       write_features)
from upfeat.inference.planning import plan_tiles
from upfeat.inference.preview import Preview
from upfeat.inference.tiled import pixels, upsample_blocks, upsample_tiled
from upfeat.viz import pca_rgb
from upfeat import upsamplers

from ._utils import skip_without_focus

# One tile of the shipped model on a real photo in a fresh process, as `upfeat upsample` runs it
# (lean_memory: no output pool, freed blocks returned to the OS): peak RSS over the RSS before it.
_MEASURE = """
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from upfeat.inference.batch import lean_memory
from upfeat.inference.memory import upsampler_bytes
from upfeat.inference.tiled import pixels, upsample_blocks
from upfeat.model import create_model

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

side, path = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = create_model("vits14_focus", "jbu").eval()
img = Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC)
x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None]
with lean_memory(), torch.inference_mode():
    low = model.lowres(pixels(x))
    upsample_blocks(model.upsampler, low[..., :4, :4], pixels(x, 0, 56, 0, 56), lambda b, c: None)
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    upsample_blocks(model.upsampler, low, pixels(x), lambda b, c: None)
    peak = status("VmHWM") - before
print(json.dumps({"peak": peak, "estimate": upsampler_bytes(model, side, side, result=False)}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak-RSS counter")
def test_streamed_jbu_tile_estimate_matches_measured_peak(data_dir):
    skip_without_focus()
    photo = data_dir / "samples" / "featup" / "skate.jpg"
    r = subprocess.run([sys.executable, "-c", _MEASURE, "336", str(photo)], capture_output=True,
                       text=True, check=True, timeout=300)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # measured (this machine): 80 MB at 224², 319 MB at 448²; the estimate errs on the safe side,
    # by at most a third (a looser estimate would mean needlessly small tiles)
    assert got["peak"] <= got["estimate"] <= 1.35 * got["peak"], got


@pytest.fixture(scope="module")
def jbu_model():
    from upfeat.backbones import wrap
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 72, 14, stride=14), torch.nn.GELU())
    up = upsamplers.create("jbu_stack", dim=72, stride=14, residual=False)
    import upfeat
    return upfeat.UpFeat(wrap(conv, stride=14, dim=72), up).eval()


def test_sink_blocks_equal_the_whole_result(jbu_model, real_image):
    x = real_image(84, 112)
    with torch.inference_mode():
        low = jbu_model.lowres(x)
        whole = jbu_model.upsampler(low, x)
        blocks = []
        upsample_blocks(jbu_model.upsampler, low, x, lambda b, c0: blocks.append((c0, b.clone())))
    assert [c0 for c0, _ in blocks] == [0, 64]  # CHANNEL_GROUP channels at a time
    assert torch.equal(torch.cat([b for _, b in blocks], 1), whole)
    with torch.no_grad():  # training-style call: one block, same numbers
        assert torch.allclose(jbu_model.upsampler(low, x), whole, atol=1e-6)


def test_uint8_image_tiles_equal_float_tiles(jbu_model, real_image):
    x = real_image(140, 250)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(pixels(u8), (u8.float() / 255))
    plan = plan_tiles((140, 250), 14, 224, 112)  # 2 tiles
    with torch.inference_mode():
        ref, _ = upsample_tiled(jbu_model, u8.float() / 255, plan)
        got, _ = upsample_tiled(jbu_model, u8, plan)
        whole = jbu_model(u8.float() / 255)
    assert torch.allclose(got, ref, atol=1e-6)  # contiguous windows: other summation orders
    assert torch.allclose(got, whole, atol=1e-4)


def test_preview_from_channel_blocks_equals_pca_of_the_features(jbu_model, real_image, tmp_path):
    x = real_image(140, 250)
    with torch.inference_mode():
        low = jbu_model.lowres(x)
        feats = jbu_model.upsampler(low, x)[0]
    prev = Preview(x[0], low[0], 14, max_side=100)  # step 3
    for (y0, y1), (x0, x1) in (((0, 100), (0, 130)), ((0, 100), (130, 250)), ((100, 140), (0, 250))):
        for c0 in (0, 50):
            prev.add(feats[c0:c0 + 50, y0:y1, x0:x1], y0, x0, c0)
    want = pca_rgb(feats[:, ::3, ::3], prev.basis)
    assert torch.allclose(prev.upsampled(), want, atol=1e-5)
    prev.save(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_write_of_channel_groups(tmp_path):
    data = torch.randn(5, 4, 6)
    path = tmp_path / "f.safetensors"
    out = FeatureWriter(path, _safetensors_header((5, 4, 6), torch.float32, {}), (5, 4, 6),
                        torch.float32)
    out.write(data[:2, :, :3], 0, 0, 0)
    out.write(data[2:, :, :3], 0, 0, 2)
    out.write(data[:, :, 3:], 0, 3)
    with pytest.raises(ValueError, match="does not fit"):
        out.write(data[:2], 0, 0, 4)
    out.check_complete()
    out.close()
    assert torch.equal(read_features(path)[0], data)


def test_tiled_jbu_through_the_file_equals_the_tensor_bit_for_bit(jbu_model, real_image, tmp_path):
    """A real frame in 3x4 tiles (bands of rows, columns, channel groups of 64 + 8) written by
    FeatureWriter (parked tile-major, rearranged per band, cast by numpy) gives the same
    float16 values as the same blocks copied into a float16 tensor by torch, which is what the
    memory-mapped writer did (the blocks are recorded once: the JBU itself may differ in the
    last bit between runs on a busy machine)."""
    H, W = 182, 250
    x = real_image(H, W)
    plan = plan_tiles((H, W), 14, 112, 56)
    assert (len(plan.ys), len(plan.xs)) == (3, 4)
    blocks = []
    with torch.inference_mode():
        upsample_tiled(jbu_model, x, plan,
                       write=lambda b, y0, x0, c0: blocks.append((b[0].clone(), y0, x0, c0)))
    want = torch.empty(72, H, W, dtype=torch.float16)
    for b, y0, x0, c0 in blocks:
        want[c0:c0 + b.shape[0], y0:y0 + b.shape[1], x0:x0 + b.shape[2]].copy_(b)

    def fill(out: FeatureWriter) -> None:
        for b, y0, x0, c0 in blocks:
            out.write(b, y0, x0, c0)
    path = write_features(tmp_path / "t.safetensors", (72, H, W), torch.float16, {}, fill)
    assert len(blocks) == 12 * 2 and torch.equal(read_features(path)[0], want)
