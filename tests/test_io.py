"""upfeat.io: every awkward input is made in tmp_path with Pillow, plus one real photo."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from upfeat._checks import ShapeError
from upfeat.io import (IMAGE_EXTENSIONS, ImageReadError, find_images, iter_images, load_image,
                       to_tensor)


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def pil_read(path) -> Image.Image:
    """Plain PIL read (mode as stored, no conversion), file closed."""
    with Image.open(path) as im:
        im.load()
    return im


def test_astronaut_matches_numpy(data_dir):
    path = data_dir / "samples/skimage/astronaut.jpg"
    x = to_tensor(load_image(path))
    expected = np.asarray(pil_read(path).convert("RGB"), dtype=np.float32) / 255
    assert x.shape == (1, 3, *expected.shape[:2]) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(expected).permute(2, 0, 1)[None],
                               rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_gray_and_1bit(tmp_path, mode):
    a = (np.arange(12 * 10).reshape(12, 10) * 2 % 256).astype(np.uint8)
    src = Image.fromarray(a).convert(mode)
    src.save(tmp_path / "g.png")
    out = rgb(load_image(tmp_path / "g.png"))
    expected = np.asarray(src.convert("L")).astype(int)
    assert out.shape == (12, 10, 3) and (out == expected[..., None]).all()


def test_rgba_la_composited_over_white(tmp_path):
    px = np.array([[[200, 100, 50, 0], [200, 100, 50, 128], [200, 100, 50, 255]]], np.uint8)
    Image.fromarray(px, "RGBA").save(tmp_path / "a.png")
    out = rgb(load_image(tmp_path / "a.png"))
    a = px[..., 3:].astype(float) / 255
    expected = px[..., :3] * a + 255 * (1 - a)
    assert np.abs(out - expected).max() <= 1
    assert (out[0, 0] == 255).all() and (out[0, 2] == [200, 100, 50]).all()
    assert (rgb(load_image(tmp_path / "a.png", background=(0, 0, 0)))[0, 0] == 0).all()
    Image.fromarray(np.array([[[90, 0], [90, 255]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert rgb(load_image(tmp_path / "la.png")).tolist() == [[[255] * 3, [90] * 3]]


@pytest.mark.parametrize("transparent", [True, False])
def test_palette(tmp_path, transparent):
    im = Image.fromarray(np.array([[0, 1, 2, 1]], np.uint8), "P")
    im.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (3 * 253))
    im.save(tmp_path / "p.png", **({"transparency": 0} if transparent else {}))
    assert pil_read(tmp_path / "p.png").mode == "P"
    first = [255, 255, 255] if transparent else [10, 20, 30]
    assert rgb(load_image(tmp_path / "p.png")).tolist() == [[first, [40, 50, 60], [70, 80, 90],
                                                             [40, 50, 60]]]


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_scaled_not_clipped(tmp_path, ext):
    values = np.array([[0, 257, 1000, 32768, 65280, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / f"g16.{ext}")
    assert pil_read(tmp_path / f"g16.{ext}").mode.startswith("I")
    out = rgb(load_image(tmp_path / f"g16.{ext}"))
    assert out[..., 0].tolist() == [[0, 1, 4, 128, 254, 255]]  # round(v * 255 / 65535)
    assert (out == out[..., :1]).all()


def test_32bit_int_and_float_tiff(tmp_path):
    Image.fromarray(np.array([[0, 65535]], np.int32)).save(tmp_path / "i.tif")
    assert rgb(load_image(tmp_path / "i.tif"))[..., 0].tolist() == [[0, 255]]
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ImageReadError, match=r"big\.tif.*\[0, 70000\].*0\.\.65535"):
        load_image(tmp_path / "big.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")
    assert rgb(load_image(tmp_path / "f.tif"))[..., 0].tolist() == [[0, 128, 255]]
    Image.fromarray(np.array([[0.0, 200.0]], np.float32)).save(tmp_path / "f255.tif")
    with pytest.raises(ImageReadError, match=r"f255\.tif.*\[0, 200\].*expected \[0, 1\]"):
        load_image(tmp_path / "f255.tif")


def test_cmyk_jpeg(tmp_path):
    colours = {(0, 0, 0, 0): (255, 255, 255), (255, 0, 0, 0): (0, 255, 255),
               (0, 255, 255, 0): (255, 0, 0), (0, 0, 0, 255): (0, 0, 0),
               (100, 50, 20, 60): (119, 157, 180)}  # (255 - c) * (255 - k) / 255
    im = Image.new("CMYK", (16 * len(colours), 16))
    for i, c in enumerate(colours):
        im.paste(c, (16 * i, 0, 16 * i + 16, 16))
    im.save(tmp_path / "c.jpg", quality=100)
    assert pil_read(tmp_path / "c.jpg").mode == "CMYK"
    out = rgb(load_image(tmp_path / "c.jpg"))
    for i, expected in enumerate(colours.values()):
        assert np.abs(out[4:12, 16 * i + 4:16 * i + 12] - expected).max() <= 3, expected


def test_cmyk_with_unusable_profile_falls_back(tmp_path):
    from PIL import ImageCms
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c.jpg", icc_profile=srgb)
    with pytest.warns(UserWarning, match=r"c\.jpg: cannot apply its CMYK colour profile"):
        out = rgb(load_image(tmp_path / "c.jpg"))
    assert np.abs(out - [0, 255, 255]).max() <= 3


def test_exif_orientation_6(tmp_path):
    # Stored 64 x 32 (W x H): quadrants red | green over blue | white. Orientation 6 = displayed
    # after a 90 degree clockwise turn, so the loaded image is 32 x 64 and the stored top-left
    # (red) ends at the top-right.
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:16, :32], stored[:16, 32:] = (255, 0, 0), (0, 255, 0)
    stored[16:, :32], stored[16:, 32:] = (0, 0, 255), (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    before = (tmp_path / "r.jpg").read_bytes()
    img = load_image(tmp_path / "r.jpg")
    assert img.size == (32, 64)
    out = rgb(img)
    decoded = np.asarray(pil_read(tmp_path / "r.jpg").convert("RGB")).astype(int)
    assert decoded.shape == (32, 64, 3) and (out == np.rot90(decoded, k=-1)).all()
    quadrant = lambda r, c: out[32 * r + 8:32 * r + 24, 16 * c + 4:16 * c + 12].mean((0, 1))
    for (r, c), colour in {(0, 0): (0, 0, 255), (0, 1): (255, 0, 0), (1, 0): (255, 255, 255),
                           (1, 1): (0, 255, 0)}.items():
        assert np.abs(quadrant(r, c) - colour).max() < 8
    assert (tmp_path / "r.jpg").read_bytes() == before  # the user's file is untouched


def test_bad_files_raise_naming_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("hello, not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    for name, problem in [("cut.jpg", "truncated"), ("notes.jpg", "not an image"),
                          ("empty.png", "empty"), ("folder.jpg", "folder")]:
        with pytest.raises(ImageReadError, match=problem) as info:
            load_image(tmp_path / name)
        msg = str(info.value)
        assert str(tmp_path / name) in msg and "\n" not in msg, msg
        assert info.value.path == tmp_path / name
    err = pickle.loads(pickle.dumps(info.value))  # crosses DataLoader worker boundaries
    assert str(err) == msg and isinstance(err, ValueError)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_one_pixel(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "one.png")
    img = load_image(tmp_path / "one.png")
    assert img.size == (1, 1) and img.getpixel((0, 0)) == (1, 2, 3)
    assert to_tensor(img).shape == (1, 3, 1, 1)


def test_large_image_and_pixel_cap(tmp_path, monkeypatch):
    big = Image.new("1", (10_000, 10_000), 1)  # 100 M pixels, 30 kB as a PNG
    big.putpixel((9_999, 0), 0)
    big.save(tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        img = load_image(tmp_path / "big.png")
    assert img.size == (10_000, 10_000) and img.mode == "RGB"
    assert img.getpixel((9_999, 0)) == (0, 0, 0) and img.getpixel((0, 0)) == (255, 255, 255)
    del img
    with pytest.raises(ImageReadError, match=r"big\.png: image is 10000 x 10000 = 100 M pixels, "
                       r"over the cap of 50 M.*max_pixels=N.*UPFEAT_MAX_PIXELS"):
        load_image(tmp_path / "big.png", max_pixels=50_000_000)
    monkeypatch.setenv("UPFEAT_MAX_PIXELS", "5e7")
    with pytest.raises(ImageReadError, match="over the cap of 50 M"):
        load_image(tmp_path / "big.png")
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 50)).save(small)
    monkeypatch.setenv("UPFEAT_MAX_PIXELS", "1000")
    with pytest.raises(ImageReadError, match=r"100 x 50 = 0.005 M pixels, over the cap of 0.001 M"):
        load_image(small)
    monkeypatch.setenv("UPFEAT_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="UPFEAT_MAX_PIXELS must be a positive number"):
        load_image(tmp_path / "big.png")
    with pytest.raises(ValueError, match="max_pixels must be a positive number"):
        load_image(tmp_path / "big.png", max_pixels=0)


def test_pil_limit_is_lifted_then_restored(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.tif")  # TIFF checks again at decode
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        pil_read(tmp_path / "a.tif")
    assert load_image(tmp_path / "a.tif").size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.fixture
def mixed(tmp_path):
    for name in ["b.png", "a.jpg", "sub/c.JPG", "sub/deeper/d.webp", ".hidden.jpg",
                 ".git/e.png", "notes.txt", "meta.json", "sub/README"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            Image.new("RGB", (8, 6), (10, 20, 30)).save(p, format="PNG")
        else:
            p.write_text("not an image")
    return tmp_path


def test_find_images_folder(mixed):
    with pytest.warns(UserWarning, match=r"skipped 3 file\(s\) that are not images") as rec:
        files = find_images(mixed)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "notes.txt" in msg and ".json: 1" in msg and "hidden" not in msg and ".git" not in msg
    assert [p.relative_to(mixed).as_posix() for p in files] == [
        "a.jpg", "b.png", "sub/c.JPG", "sub/deeper/d.webp"]
    with pytest.warns(UserWarning, match="skipped 2"):
        shallow = find_images(str(mixed), recursive=False)
    assert [p.name for p in shallow] == ["a.jpg", "b.png"]


def test_find_images_explicit_files_and_errors(mixed):
    with pytest.warns(UserWarning, match=r"skipped 1 .*sub/README") as rec:
        files = find_images([mixed / "notes.txt", mixed / "sub", mixed / "sub/c.JPG"])
    assert len(rec) == 1  # notes.txt, given explicitly, is not among the skipped
    assert [p.relative_to(mixed).as_posix() for p in files] == [
        "notes.txt", "sub/c.JPG", "sub/deeper/d.webp"]  # kept as given, no duplicate
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        find_images([mixed / "a.jpg", mixed / "nope.jpg"])


def test_iter_images_reports_bad_files(mixed):
    (mixed / "sub/bad.png").write_text("broken")
    with pytest.warns(UserWarning):
        items = list(iter_images(mixed))
    names = [p.name for p, _ in items]
    assert names == ["a.jpg", "b.png", "bad.png", "c.JPG", "d.webp"]
    bad = [x for _, x in items if isinstance(x, ImageReadError)]
    assert len(bad) == 1 and bad[0].path == mixed / "sub/bad.png"
    assert all(x.size == (8, 6) for _, x in items if isinstance(x, Image.Image))
    with pytest.raises(FileNotFoundError):
        iter_images(mixed / "missing")  # at the call, not at the first next()


# ----------------------------------------------------------------------------- to_tensor


def test_to_tensor_numpy():
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = to_tensor(a)
    assert x.shape == (1, 3, 5, 7) and x.dtype == torch.float32 and x.is_contiguous()
    assert x[0, 2, 4, 6] == a[4, 6, 2] / np.float32(255)
    gray = to_tensor(a[..., 0])
    assert torch.equal(gray, to_tensor(a[..., :1])) and torch.equal(gray[:, 0], gray[:, 2])
    u16 = to_tensor(np.array([[0, 65535]], np.uint16))
    assert torch.equal(u16, torch.tensor([0.0, 1.0]).expand(1, 3, 1, 2))
    f = np.random.default_rng(1).random((4, 4, 3))
    torch.testing.assert_close(to_tensor(f)[0], torch.from_numpy(f).float().permute(2, 0, 1))
    assert to_tensor(np.full((2, 2), 1.02, np.float16)).max() == 1  # small overshoot clamped
    rgba = np.array([[[200, 100, 50, 0], [200, 100, 50, 255]]], np.uint8)
    over_white = torch.tensor([[1.0, 200 / 255], [1.0, 100 / 255], [1.0, 50 / 255]])
    assert torch.allclose(to_tensor(rgba)[0, :, 0], over_white)


def test_to_tensor_tensors():
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = to_tensor(x)
    assert y.dtype == torch.float32 and torch.allclose(y, x.float())
    y.sum().backward()
    assert x.grad is not None
    assert to_tensor(torch.rand(3, 4, 5)).shape == (1, 3, 4, 5)
    g = to_tensor(torch.rand(2, 1, 4, 5))
    assert g.shape == (2, 3, 4, 5) and torch.equal(g[:, 0], g[:, 1])
    assert to_tensor(torch.rand(4, 5)).shape == (1, 3, 4, 5)
    assert torch.equal(to_tensor(torch.full((3, 1, 1), 255, dtype=torch.uint8)),
                       torch.ones(1, 3, 1, 1))


def test_to_tensor_pil_and_lists():
    img = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(2, 4, 3))
    torch.testing.assert_close(to_tensor(img), to_tensor(np.asarray(img)), rtol=0, atol=0)
    la = Image.new("LA", (4, 2), (0, 0))
    batch = to_tensor([img, la, Image.new("I;16", (4, 2), 65535)])
    assert batch.shape == (3, 3, 2, 4)
    assert (batch[1] == 1).all() and (batch[2] == 1).all()  # transparent -> white; 16-bit max
    assert to_tensor((np.zeros((2, 4)), torch.zeros(1, 3, 2, 4))).shape == (2, 3, 2, 4)


@pytest.mark.parametrize("bad, exc, match", [
    (np.zeros((4, 5, 2), np.uint8), ShapeError, r"img must be an array .* got shape \(4, 5, 2\)"),
    (np.zeros((3, 8, 9), np.uint8), ShapeError, "channels first"),
    (np.zeros((1, 4, 5, 3), np.uint8), ShapeError, r"\(1, 4, 5, 3\)"),
    (np.zeros((4, 5, 3), np.int64), TypeError, "dtype torch.int64"),
    (np.full((4, 5, 3), 200.0), ValueError, r"\[200, 200\] \(looks like 0\.\.255"),
    (np.full((4, 5), np.nan, np.float32), ValueError, "NaN"),
    (torch.full((1, 3, 2, 2), -2.1), ValueError, "normalised"),
    (torch.zeros(2, 4, 5), ShapeError, r"got shape \(2, 4, 5\)"),
    (torch.zeros(4, 5, 3), ShapeError, "channels last"),
    (torch.zeros(1, 3, 0, 5), ShapeError, "empty"),
    ([], ValueError, "empty list"),
    ([np.zeros((4, 5)), np.zeros((4, 6))], ShapeError, r"img\[0\] \(4, 5\) and img\[1\] \(4, 6\)"),
    ([np.zeros((4, 5)), "x"], TypeError, r"img\[1\] must be .* got str"),
    ("photo.jpg", TypeError, r"load_image\(path\)"),
    (Image.fromarray(np.full((2, 2), 9.0, np.float32)), ValueError, r"img: float image"),
])
def test_to_tensor_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        to_tensor(bad)
