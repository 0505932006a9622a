"""Feature files: streamed safetensors / npy, readable by the standard libraries, atomic."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from upfeat.inference.featfile import read_features, write_features


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_round_trip_with_standard_readers(tmp_path, fmt, dtype):
    data = torch.randn(5, 7, 3)
    path = tmp_path / "sub" / f"x.{fmt}"
    meta = {"backbone": "vits14_focus", "size": "7 3", "tiles": 4}

    def fill(out) -> None:
        assert out.tensor.shape == (5, 7, 3) and out.tensor.dtype == dtype
        out.write(data[:, :4, :2])  # blocks, as tiles are
        out.write(data[:, :4, 2:], 0, 2)
        out.write(data[:, 4:], 4, 0)

    assert write_features(path, (5, 7, 3), dtype, meta, fill) == path
    want = data.to(dtype)
    if fmt == "safetensors":
        assert torch.equal(load_file(str(path))["features"], want)
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"backbone": "vits14_focus", "size": "7 3", "tiles": "4"}
    else:
        assert torch.equal(torch.from_numpy(np.load(path)), want)
        assert json.loads(path.with_suffix(".json").read_text())["tiles"] == "4"
    feats, got = read_features(path)
    assert torch.equal(feats, want) and got["backbone"] == "vits14_focus"
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def test_failure_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "x.safetensors"

    def ok(out) -> None:
        out.write(torch.ones(2, 2, 2))

    def boom(out) -> None:
        out.write(torch.full((2, 2, 2), 2.0))
        raise RuntimeError("out of memory in tile 3")

    with pytest.raises(RuntimeError, match="tile 3"):
        write_features(tmp_path / "y.safetensors", (2, 2, 2), torch.float32, {}, boom)
    write_features(path, (2, 2, 2), torch.float32, {}, ok)
    with pytest.raises(RuntimeError):
        write_features(path, (2, 2, 2), torch.float32, {}, boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temp, no y
    assert torch.equal(read_features(path)[0], torch.ones(2, 2, 2))


def test_rejects_other_extensions(tmp_path):
    with pytest.raises(ValueError, match="must end in .safetensors or .npy"):
        write_features(tmp_path / "x.pt", (1, 1, 1), torch.float32, {}, lambda out: None)


def test_written_pages_leave_the_process(tmp_path):
    """A 96 MB output streamed in blocks: resident memory grows by far less than the file."""
    C, H, W = 96, 500, 1000

    def rss_file() -> int:  # file-backed resident pages of this process, bytes
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssFile:"))

    before, block = [], torch.randn(C, 100, 200)

    def fill(out) -> None:
        before.append(rss_file())
        for y in range(0, H, 100):
            for x in range(0, W, 200):
                out.write(block, y, x)
        before.append(rss_file())

    path = write_features(tmp_path / "big.safetensors", (C, H, W), torch.float16, {}, fill)
    assert before[1] - before[0] < 40 * 2**20  # vs 96 MB written
    with pytest.raises(ValueError, match="does not fit"):
        write_features(tmp_path / "bad.npy", (2, 2, 2), torch.float32, {},
                       lambda out: out.write(torch.zeros(2, 2, 2), 1, 0))
    feats = load_file(str(path))["features"]
    assert torch.equal(feats[:, 400:, 800:], block.half())
