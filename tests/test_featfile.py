"""Feature files: streamed safetensors / npy, readable by the standard libraries, atomic, each
byte written about once."""
from __future__ import annotations

import json
import os

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
        assert out.shape == (5, 7, 3) and out.dtype == dtype
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


def _written() -> int:
    """Bytes this process sent towards the disk: dirtied in the page cache (write_bytes) less
    those dropped before writeback (cancelled_write_bytes), Linux."""
    with open("/proc/self/io") as f:
        io = dict(ln.split(": ") for ln in f.read().splitlines())
    return int(io["write_bytes"]) - int(io["cancelled_write_bytes"])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="Linux I/O accounting")
@pytest.mark.parametrize("flush_parked", [False, True])
def test_tiles_reach_the_disk_about_once(tmp_path, flush_parked):
    """A 96 MB float16 output written as 5x5 tiles of 2 channel groups, the output file forced
    to disk after every tile (the kernel's writeback at its worst; the memory-mapped writer,
    whose tiles wrote their rows in place, sent 5.5x the file): its pages go once; the parked
    blocks too if the kernel flushed them before their band was complete (< 2x in all).
    Neither the file nor a band of it stays in the process."""
    C, H, W = 96, 500, 1000
    data = torch.randn(C, H, W)

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))

    seen = []

    def fill(out) -> None:
        (tmp,) = tmp_path.glob(".*.tmp")
        fd = os.open(tmp, os.O_RDONLY)
        seen.append(rss())
        for y in range(0, H, 100):
            for x in range(0, W, 200):
                for c0 in (0, 64):
                    out.write(data[c0:c0 + 64, y:y + 100, x:x + 200], y, x, c0)
                os.fdatasync(fd)
                if flush_parked:
                    os.fdatasync(out._scratch.fileno())  # private: the unnamed scratch file
        os.close(fd)
        seen.append(rss())

    before = _written()
    path = write_features(tmp_path / "big.safetensors", (C, H, W), torch.float16, {}, fill)
    # 0 where the file system does not account writes (tmpfs): nothing to measure then
    assert _written() - before < (1.95 if flush_parked else 1.05) * C * H * W * 2
    assert seen[1] - seen[0] < 20 * 2**20  # vs 96 MB written
    assert torch.equal(load_file(str(path))["features"], data.half())


def test_band_order_and_fit_are_checked(tmp_path):
    data = torch.randn(3, 4, 6)

    def fill(out) -> None:
        with pytest.raises(ValueError, match="does not fit"):
            out.write(torch.zeros(2, 2, 2), 3, 0)
        out.write(data[:, :2, :4], 0, 0)
        with pytest.raises(ValueError, match="must come after the others"):
            out.write(data[:2, 2:, 4:], 2, 4)  # the band's last block before its others
        with pytest.raises(ValueError, match="must come after the others"):
            out.write(data[:, :2, :4], 0, 0)  # twice
        out.write(data[:, :2, 4:], 0, 4)  # rows 0:2 complete
        out.write(data[:, 2:, :4], 2, 0)  # rows 2:4 never completed

    with pytest.raises(ValueError, match="rows 2:4 of the features were not all written"):
        write_features(tmp_path / "x.npy", (3, 4, 6), torch.float32, {}, fill)
    assert list(tmp_path.iterdir()) == [tmp_path / "x.json"]  # no feature file, no temp file


def test_tiled_writes_without_positioned_io(tmp_path, monkeypatch):
    """Where ``os`` has no ``pwrite``/``preadv`` (Windows) the writer seeks and writes: the same
    file, tiles parked and assembled alike."""
    monkeypatch.delattr(os, "pwrite", raising=False)
    monkeypatch.delattr(os, "preadv", raising=False)
    data = torch.randn(3, 40, 50)

    def fill(out) -> None:
        for y in range(0, 40, 16):
            for x in range(0, 50, 20):
                out.write(data[:, y:y + 16, x:x + 20], y, x)

    path = write_features(tmp_path / "f.safetensors", (3, 40, 50), torch.float32, {}, fill)
    assert torch.equal(load_file(str(path))["features"], data)
