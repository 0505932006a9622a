"""``upfeat upsample`` as a new user runs it: odd and broken inputs, re-runs, errors, DDP.

Every input is generated here with Pillow. Most runs use ``--upsampler bilinear``; the JBU runs
from an untrained checkpoint written here (the shipped one is trained elsewhere; tiling the JBU
is covered in tests/test_tiling.py). Runs that need no separate process use typer's CliRunner.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

import upfeat
from upfeat.apps.cli import app
from upfeat.inference.featfile import read_features

FAST = ["--upsampler", "bilinear", "--no-progress"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "upfeat", "upsample", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def upsample_in_process(*args: str):
    """The CLI in this process (no interpreter start-up): exit code, stdout, stderr."""
    return CliRunner().invoke(app, ["upsample", *args])


def _decoded(path: Path) -> np.ndarray:
    """Pixels of a file as Pillow decodes them, without upfeat (lossy JPEGs)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def make_inputs(root: Path) -> dict[str, np.ndarray | tuple[int, int]]:
    """Every kind of image a user may have. Returns output name -> the RGB pixels upfeat must
    see (derived here, independently of upfeat.io), or the (H, W) of the shrunk 10000 px image."""
    (root / "sub" / "deep").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(root / "rgb.jpg")
    Image.new("L", (120, 77), 90).save(root / "gray.png")
    rgba = Image.new("RGBA", (64, 48), (255, 0, 0, 0))  # transparent red: shown as white
    ImageDraw.Draw(rgba).rectangle((10, 10, 40, 30), fill=(0, 0, 255, 255))
    rgba.save(root / "rgba.png")
    on_white = np.full((48, 64, 3), 255, np.uint8)
    on_white[10:31, 10:41] = (0, 0, 255)
    pal = Image.new("P", (50, 40), 1)
    pal.putpalette([0, 0, 0, 255, 255, 0] + [0] * 762)
    pal.save(root / "palette.png", transparency=0)
    png16 = np.arange(6000, dtype=np.uint16).reshape(60, 100) * 10
    Image.fromarray(png16).save(root / "png16.png")
    assert Image.open(root / "png16.png").mode == "I;16"
    Image.new("CMYK", (80, 60), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    with Image.open(root / "cmyk.jpg") as im:
        cmyk = np.asarray(im).astype(np.float64)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 30 high; viewers turn it 90 degrees clockwise
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "exif.jpg",
                                                                               exif=exif)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "tiny.png")
    Image.new("RGB", (33, 21), "white").save(root / "sub" / "deep" / "nested.jpg")
    Image.new("RGB", (20, 20), "red").save(root / "dup.jpg")
    huge = Image.new("RGB", (10000, 10000), (40, 120, 200))
    ImageDraw.Draw(huge).ellipse((2000, 2000, 8000, 8000), fill=(230, 200, 20))
    huge.save(root / "huge.jpg", quality=80)
    good = root / "ok.png"  # truncated copy of a valid PNG
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    (root / "trunc.png").write_bytes(good.read_bytes()[:2000])
    good.unlink()
    (root / "fake.jpg").write_text("this is not a JPEG")
    (root / "notes.txt").write_text("a text file")
    gray = lambda a: np.repeat(np.asarray(a, np.uint8)[..., None], 3, axis=2)  # noqa: E731
    return {"rgb": _decoded(root / "rgb.jpg"), "gray": gray(np.full((77, 120), 90)),
            "rgba": on_white, "palette": np.broadcast_to(np.uint8([255, 255, 0]), (40, 50, 3)),
            "png16": gray((png16.astype(np.float64) * 255 / 65535).round()),
            "cmyk": ((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).round().astype(np.uint8),
            "exif": np.rot90(_decoded(root / "exif.jpg"), k=-1),
            "tiny": np.uint8([[[10, 200, 30]]]),
            "sub/deep/nested": _decoded(root / "sub" / "deep" / "nested.jpg"),
            "dup": _decoded(root / "dup.jpg"),
            "huge": (448, 448)}


def test_folder_of_odd_and_broken_images(tmp_path):
    src, out = tmp_path / "photos", tmp_path / "feats"
    expected = make_inputs(src)
    args = [str(src), str(src / "notes.txt"), "--out", str(out), "--format", "npy", "--viz",
            "--dtype", "float16", "--max-side", "448", "--max-memory", "1GB", "--upsampler",
            "bilinear"]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]  # some files failed, the rest was written
    failed = [ln for ln in r.stderr.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == 3, r.stderr
    for name, problem in (("trunc.png", "truncated or corrupt"), ("fake.jpg", "not an image"),
                          ("notes.txt", "not an image")):
        assert any(str(src / name) in ln and problem in ln for ln in failed), (name, failed)
    assert "wrote 11, skipped 0 already done, failed 3 of 14 image(s)" in r.stdout
    assert "skipped 1 file(s) that are not images by extension" in r.stderr  # notes.txt, in photos/
    assert "upsample: 100%" in r.stderr and "14/14" in r.stderr  # the progress bar
    # the 10000x10000 image, shrunk to 448 px, is still over what the 1 GB leaves after torch
    # and the model (~0.8 GB, measured by the run) in one pass: tiled
    tiled = [ln for ln in r.stdout.splitlines() if "huge.jpg" in ln]
    assert len(tiled) == 1 and "448x448 px" in tiled[0] and "tiles of" in tiled[0], r.stdout
    assert "one pass would need ~" in tiled[0] and "> budget 1.0 GB - " in tiled[0]
    assert " already in use" in tiled[0]

    model = upfeat.create_model("vits14_focus", "bilinear")
    for name, want in expected.items():
        feats, meta = read_features(out / f"{name}.npy")
        h, w = want if isinstance(want, tuple) else want.shape[:2]
        assert feats.shape == (384, h, w) and feats.dtype == torch.float16, name
        assert torch.isfinite(feats).all(), name
        assert meta["size"] == f"{h} {w}" and meta["backbone"] == "vits14_focus"
        with Image.open(out / f"{name}.pca.png") as png:  # image | low-res | upsampled
            assert png.size == (3 * w + 8, h), name
            viz = np.asarray(png.convert("RGB"))
        if isinstance(want, np.ndarray):  # the pixels a viewer shows, and their features
            assert np.abs(viz[:, :w].astype(int) - want).max() <= 1, name
            with torch.no_grad():
                ref = model(torch.from_numpy(want.copy()).permute(2, 0, 1)[None].float() / 255)
            torch.testing.assert_close(feats.float(), ref[0], atol=1e-2, rtol=2e-3)  # float16
    meta = read_features(out / "huge.npy")[1]
    assert meta["original_size"] == "10000 10000" and int(meta["tiles"]) > 1
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(made) == 3 * len(expected) and not [p for p in made if "/." in "/" + p]  # no temp

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = upsample_in_process(*args, "--no-progress")
    assert again.exit_code == 1
    assert "wrote 0, skipped 11 already done, failed 3 of 14 image(s)" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps  # nothing rewritten


def test_output_names_do_not_depend_on_siblings(tmp_path):
    """Issue 15: ``a.png`` is always ``OUT/a.<format>``; a second input with the same name
    (``a.jpg`` beside it) is a clash, reported before anything runs."""
    from upfeat.inference.jobs import list_items
    Image.new("RGB", (20, 20), "red").save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (20, 20), "red").save(tmp_path / "sub" / "b.png")
    alone = list_items((str(tmp_path),), tmp_path / "o", "npy", True)
    assert [(i.out.name, i.png.name) for i in alone] == [("a.npy", "a.pca.png"), ("b.npy", "b.pca.png")]
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match=r"a\.(jpg|png) and .*a\.(jpg|png) would both be written "
                                         r"to .*a\.npy; process them with separate --out folders"):
        list_items((str(tmp_path),), tmp_path / "o", "npy", False)
    (only,) = list_items((str(tmp_path / "a.png"),), tmp_path / "o", "npy", False)
    assert only.out == tmp_path / "o" / "a.npy"  # the same name as without the sibling


def test_safetensors_output_and_forced_tiles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img = tmp_path / "wide.png"
    pixels = np.random.default_rng(1).integers(0, 256, (70, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(img)
    r = upsample_in_process(str(img), "--out", "o", "--tile", "112", "--size", "84", "210", *FAST)
    assert r.exit_code == 0, r.output
    feats, meta = read_features(tmp_path / "o" / "wide.safetensors")
    assert feats.shape == (384, 84, 210) and feats.dtype == torch.float32
    assert meta["original_size"] == "70 200" and meta["size"] == "84 210" and meta["tiles"] == "3"
    assert meta["backbone_tiles"] == "1"  # the ViT still sees the whole image
    assert meta["upsampler"] == "bilinear" and meta["source"] == str(img)
    assert "1x3 tiles of 112 px (overlap 56 px)" in r.stdout, r.stdout
    resized = Image.fromarray(pixels).resize((210, 84), Image.BICUBIC, reducing_gap=3.0)
    with torch.inference_mode():  # tiled == one pass (the upsampler is local)
        ref = upfeat.create_model("vits14_focus", "bilinear")(resized)[0]
    torch.testing.assert_close(feats, ref, atol=5e-5, rtol=0)


def test_trained_checkpoint_as_upsampler(tmp_path, monkeypatch):
    from ._utils import save_untrained_model
    monkeypatch.chdir(tmp_path)
    save_untrained_model(tmp_path / "run" / "model.safetensors")
    pixels = np.random.default_rng(2).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    r = upsample_in_process("a.png", "--out", "o", "--upsampler", "run", "--no-progress")
    assert r.exit_code == 0, r.output
    feats, meta = read_features(tmp_path / "o" / "a.safetensors")
    with torch.inference_mode():
        ref = upfeat.load(tmp_path / "run")(pixels)[0]
    torch.testing.assert_close(feats, ref)
    assert meta["upsampler"] == "run"


@pytest.mark.parametrize("args,message", [
    (["missing.jpg"], "no such image file or folder: missing.jpg"),
    (["--backbone", "vit_nope"], "unknown backbone 'vit_nope'. Did you mean: vits14_focus?"),
    (["--size", "10", "10", "--max-side", "5"], "give --size or --max-side, not both"),
    (["--max-memory", "lots"], "--max-memory must be a size like 4GB"),
    (["--format", "pt"], "--format must be one of safetensors, npy, got 'pt'"),
    (["--tile", "100"], "--tile 100 must be a multiple of the stride 14 of vits14_focus, e.g. 98"),
    (["--upsampler", "jbu"], "the shipped weights 'jbu' (jbu_stack:agnostic) are not in this install"),
    (["--accelerator", "tpu"], "--accelerator must be one of auto, cpu, cuda, gpu, got 'tpu'"),
])
def test_usage_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch, args, message):
    import upfeat.model
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(upfeat.upsamplers.pretrained, "WEIGHTS", tmp_path / "no-weights")
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    r = upsample_in_process("a.png", "--out", "o", *FAST, *args)
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_ddp_two_processes_shard_the_folder(tmp_path):
    src, out = tmp_path / "imgs", tmp_path / "feats"
    names = []
    for i in range(6):
        rel = Path("ab"[i % 2]) / f"img{i}.png"
        (src / rel.parent).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (30 + 7 * i, 20 + 5 * i), (40 * i, 100, 200)).save(src / rel)
        names.append(rel.with_suffix(".safetensors"))
    (src / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (out / "a").mkdir(parents=True)
    (out / "a" / "img2.safetensors").write_text("not features")  # a broken earlier output
    args = [str(src), "--out", str(out), "--accelerator", "cpu", "--devices", "2", "--strategy",
            "ddp", *FAST]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "on cpu x 2 processes" in r.stdout  # two ranks, whose counts add up to one each:
    assert "wrote 6, skipped 0 already done, failed 1 of 7 image(s)" in r.stdout, r.stdout
    assert "redoing" in r.stdout and "incomplete or unreadable" in r.stdout  # the broken one
    failed = [ln for ln in r.stderr.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == 1 and f"cannot read image {src / 'b' / 'broken.png'}: " in failed[0]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(names)  # exactly one output per image, no temp files
    for name in names:
        feats, meta = read_features(out / name)
        assert meta["source"] == str(src / name.with_suffix(".png"))
        assert feats.shape[0] == 384
    (src / "b" / "broken.png").unlink()
    again = run_cli(*args, cwd=tmp_path)  # all done: returns before starting processes
    assert again.returncode == 0
    assert "wrote 0, skipped 6 already done, failed 0 of 6" in again.stdout
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == files


def test_output_larger_than_the_free_disk_fails_before_computing(tmp_path, monkeypatch):
    """A 10000x10000 image at full resolution: 384 x 10^8 float32 = 153.6 GB. Checked against
    the free space before anything is computed or written (in process; free space mocked)."""
    import shutil

    from upfeat.inference import batch as infer
    from upfeat.inference.jobs import list_items
    from upfeat.inference.memory import resident_memory
    from upfeat import upsamplers

    Image.new("RGB", (10000, 10000), (40, 120, 200)).save(tmp_path / "huge.png", compress_level=1)
    bb = upfeat.backbones.wrap(torch.nn.Conv2d(3, 384, 14, stride=14), stride=14, dim=384)
    model = upfeat.UpFeat(bb, upsamplers.create("bilinear", dim=384, stride=14)).eval()
    cfg = infer.UpsampleConfig(inputs=(str(tmp_path / "huge.png"),), out=str(tmp_path / "o"))
    (item,) = list_items(cfg.inputs, cfg.out, cfg.format, cfg.viz)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(infer.shutil, "disk_usage", lambda p: usage._replace(free=67 * 10**9))
    notes: list[str] = []
    # + one band of rows of tiles (FeatureWriter's scratch file)
    with pytest.raises(OSError, match=r"384x10000x10000 float32 output needs 153.6 GB on disk "
                                      r"\(\+ [\d.]+ GB while its tiles are written\), only "
                                      r"67.0 GB free"):
        # 4 GB above what this process already holds (the suite's earlier tests leave some)
        infer.process(model, item, cfg, resident_memory() + 4 * 10**9, torch.device("cpu"),
                      notes.append)
    assert notes == [] and not any((tmp_path / "o").iterdir())


def test_reruns_redo_stale_truncated_and_other_settings(tmp_path, monkeypatch):
    """Issue 15: a re-run skips an output only when it is complete and made with the same
    settings; options are checked even when every output exists."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 40, 3), np.uint8)).save("img.png")
    out = tmp_path / "o" / "img.safetensors"
    r = upsample_in_process("img.png", "--out", "o", *FAST, "--dtype", "float16")
    assert r.exit_code == 0 and "wrote 1" in r.stdout, r.output
    assert read_features(out)[0].dtype == torch.float16
    r = upsample_in_process("img.png", "--out", "o", *FAST, "--dtype", "float16")
    assert "skipped 1 already done" in r.stdout
    # other settings: redone, with a note
    r = upsample_in_process("img.png", "--out", "o", *FAST, "--dtype", "float32", "--size", "28", "42")
    assert r.exit_code == 0 and "wrote 1" in r.stdout, r.output
    assert f"redoing {Path('o') / 'img.safetensors'}: made with other settings" in r.output
    feats, meta = read_features(out)
    assert feats.dtype == torch.float32 and feats.shape[1:] == (28, 42) and meta["dtype"] == "float32"
    # truncated: redone
    os.truncate(out, 1000)
    r = upsample_in_process("img.png", "--out", "o", *FAST, "--size", "28", "42")
    assert "wrote 1" in r.stdout and "incomplete or unreadable" in r.output, r.output
    assert read_features(out)[0].shape == (384, 28, 42)
    # a bad option is an error even though everything is done
    for bad, msg in ((["--upsampler", "nosuch"], "no checkpoint 'nosuch'"),
                     (["--accelerator", "tpu"], "--accelerator must be one of")):
        r = upsample_in_process("img.png", "--out", "o", *FAST, "--size", "28", "42", *bad)
        assert r.exit_code == 2 and msg in r.stderr, r.output


def test_stale_temp_files_are_removed_and_sigterm_cleans_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (20, 20)).save("a.png")
    (tmp_path / "o").mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # a pid nobody has now
    stale = [tmp_path / "o" / f".a.safetensors.{gone}.x1y2.tmp", tmp_path / "o" / ".a.safetensors.k3j4.tmp"]
    live = tmp_path / "o" / f".a.safetensors.{os.getppid()}.z9z9.tmp"  # a running process's
    for p in (*stale, live):
        p.write_bytes(b"0" * 100)
    r = upsample_in_process("a.png", "--out", "o", *FAST)
    assert r.exit_code == 0 and "removed 2 temporary file(s) a killed run left" in r.output, r.output
    assert not any(p.exists() for p in stale) and live.exists()
    # SIGTERM during a write: SystemExit(143), the temporary file is removed
    code = ("import os, signal, pathlib\n"
            "from upfeat.checkpoint import atomic_write\n"
            "from upfeat.inference.batch import sigterm_as_exit\n"
            "def write(tmp):\n"
            "    tmp.write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "with sigterm_as_exit():\n"
            "    atomic_write(pathlib.Path('t') / 'f.bin', write)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 143, r.stderr
    assert (tmp_path / "t").is_dir() and not list((tmp_path / "t").iterdir())


def test_shards_split_a_folder_and_report_throughput(tmp_path):
    """--shard i/n (independent jobs, e.g. a SLURM array): disjoint parts that together write
    every image once; the summary reports images/s; a run over the whole folder then skips all."""
    src, out = tmp_path / "imgs", tmp_path / "feats"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (28 + 14 * i, 28), (40 * i, 0, 0)).save(src / f"{i}.png")
    runs = [upsample_in_process(str(src), "--out", str(out), "--shard", f"{k}/2", *FAST)
            for k in (0, 1)]
    assert [r.exit_code for r in runs] == [0, 0], runs[0].output + runs[1].output
    assert "wrote 3, skipped 0 already done, failed 0 of 3 image(s)" in runs[0].stdout
    assert "wrote 2, skipped 0 already done, failed 0 of 2 image(s)" in runs[1].stdout
    assert "images/s)" in runs[0].stdout
    assert {p.name for p in out.iterdir()} == {f"{i}.safetensors" for i in range(5)}
    assert read_features(out / "3.safetensors")[0].shape[-2:] == (28, 70)
    again = upsample_in_process(str(src), "--out", str(out), *FAST)
    assert "wrote 0, skipped 5 already done" in again.stdout
    bad = upsample_in_process(str(src), "--out", str(out), "--shard", "2/2", *FAST)
    assert bad.exit_code == 2 and "--shard must be i/n with 0 <= i < n" in bad.stderr
