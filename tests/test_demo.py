"""``upfeat demo``: the offline figure image | low-res | bilinear | JBU, one row per photo.

The shipped ``vits14_focus_jbu`` is trained elsewhere; these tests use an untrained JBU checkpoint
written here, once as the shipped file and once through ``--checkpoint``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import upfeat.model
from upfeat.apps import demo_figure as figure
from upfeat.apps.cli import app
from upfeat.io import to_tensor
from upfeat.inference.jobs import prepare
from upfeat import upsamplers
from upfeat.viz import fit_pca, pca_rgb

from ._utils import save_untrained_model

PHOTOS = ["skimage/chelsea.jpg", "skimage/coffee.jpg"]


def demo(*args: str):
    return CliRunner().invoke(app, ["demo", "--no-progress", *args])


@pytest.fixture
def photos(data_dir, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for name in PHOTOS:
        shutil.copy(data_dir / "samples" / name, root / name.split("/")[1])
    (root / "broken.jpg").write_bytes((root / "coffee.jpg").read_bytes()[:3000])
    return root


def test_default_photos_are_the_shared_samples_or_the_env_var(data_dir, tmp_path, monkeypatch):
    from upfeat.apps._samples import SAMPLES_ENV, default_samples
    monkeypatch.delenv(SAMPLES_ENV, raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # a clone's root, ../shared beside it
    assert default_samples().resolve() == (data_dir / "samples").resolve()
    assert len(figure.find_images(default_samples())) >= 10
    monkeypatch.setenv(SAMPLES_ENV, str(tmp_path))
    assert default_samples() == tmp_path


def test_figure_rows_with_the_shipped_checkpoint(photos, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    save_untrained_model(weights / "jbu.safetensors")
    monkeypatch.setattr(upfeat.upsamplers.pretrained, "WEIGHTS", weights)
    grids = []
    real_save_grid = figure.save_grid
    monkeypatch.setattr(figure, "save_grid", lambda rows, path, **kw: (
        grids.append((rows, kw)), real_save_grid(rows, path, **kw)))
    r = demo("--images", str(photos), "--out", str(tmp_path / "o" / "demo.png"), "--max-side", "112")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[-1] == f"wrote {tmp_path / 'o' / 'demo.png'} (2 photo(s))"
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped: ")]
    assert len(skipped) == 1 and f"{photos / 'broken.jpg'}: truncated or corrupt" in skipped[0]
    with Image.open(tmp_path / "o" / "demo.png") as png:
        assert png.format == "PNG" and png.size == (4 * 360, 2 * 360)  # 4 columns, 2 rows

    (rows, kw), = grids
    model = upfeat.load("jbu")  # what `upfeat demo` used: the untrained stand-in saved above
    assert kw["titles"] == ["image", "low-res vits14_focus", "bilinear", "JBU"]
    for row, name in zip(rows, ("chelsea.jpg", "coffee.jpg")):
        img = to_tensor(prepare(photos / name, None, 112)[0])[0]
        assert img.shape == (3, 75, 112)  # 451x300 and 600x400 shrunk to 112 px
        assert [tuple(p.shape) for p in row] == [(3, 75, 112)] * 4
        torch.testing.assert_close(row[0], img)
        low, bil, jbu = row[1:]
        cells = low[:, :70, :].unflatten(1, (5, 14)).unflatten(3, (8, 14))  # (3, 5, 14, 8, 14)
        assert torch.equal(cells, cells[:, :, :1, :, :1].expand_as(cells))  # one colour per cell
        assert (bil[:, :, 1:] - bil[:, :, :-1]).abs().max() < 0.5 * (
            low[:, :, 1:] - low[:, :, :-1]).abs().max()  # bilinear is smooth ...
        assert (jbu - bil).abs().mean() > 0.01  # ... and the JBU differs from it
        # one PCA basis per row, fitted on the low-res features
        with torch.inference_mode():
            feats = model.lowres(img[None])
            basis = fit_pca(feats)
            want = [pca_rgb(f, basis)[0] for f in (
                feats, upsamplers.create("bilinear", dim=384, stride=14)(feats, img[None]),
                model(img[None]))]
        torch.testing.assert_close(low[:, ::14, ::14], want[0][:, :, :8])
        torch.testing.assert_close(bil, want[1])
        torch.testing.assert_close(jbu, want[2])


def test_checkpoint_option_takes_a_run_folder(data_dir, tmp_path):
    save_untrained_model(tmp_path / "run" / "model.safetensors")
    photo = data_dir / "samples" / PHOTOS[0]
    r = demo("--images", str(photo), "--checkpoint", str(tmp_path / "run"), "--out",
             str(tmp_path / "d.png"), "--max-side", "56")
    assert r.exit_code == 0, r.output
    assert "1 photo(s): vits14_focus + bilinear / jbu_stack, longer side 56 px" in r.stdout
    assert (tmp_path / "d.png").is_file()


@pytest.mark.parametrize("case,message", [
    ("no_shipped", "the shipped weights 'jbu' (jbu_stack:agnostic) are not in this install"),
    ("no_samples", "expected in ../shared/data beside the repository clone, or in $UPFEAT_SAMPLES); pass --images DIR"),
    ("missing_images", "no such image file or folder: nowhere; pass --images DIR"),
    ("bad_checkpoint", "not a readable safetensors file"),
    ("no_images", "no images in empty"),
    ("unreadable", "no readable images in empty: cannot read image empty/bad.png: not an image"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch, case, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(upfeat.upsamplers.pretrained, "WEIGHTS", tmp_path / "no-weights")
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.safetensors").write_text("not a checkpoint")
    monkeypatch.delenv("UPFEAT_SAMPLES", raising=False)  # the cwd is tmp_path: no ../shared
    args = {"no_shipped": ["--images", "empty"],
            "no_samples": ["--checkpoint", "fake.safetensors"],
            "missing_images": ["--images", "nowhere"],
            "bad_checkpoint": ["--images", "one.png", "--checkpoint", "fake.safetensors"],
            "no_images": ["--images", "empty", "--checkpoint", "fake.safetensors"],
            "unreadable": ["--images", "empty", "--checkpoint", "fake.safetensors"]}[case]
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    Image.new("RGB", (20, 20)).save(tmp_path / "one.png")
    if case == "unreadable":
        save_untrained_model(tmp_path / "fake.safetensors")
        (tmp_path / "empty" / "bad.png").write_text("not an image either")
    r = demo(*args)
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert not (tmp_path / "demo.png").exists()
    if case == "no_shipped":
        assert "pass --checkpoint PATH" in errors[0]


def test_one_row_per_photo_and_backbone(data_dir, tmp_path, monkeypatch):
    """--backbone twice with a backbone-agnostic checkpoint: a ViT row and a CNN row per photo,
    each with its own low-res grid and titles."""
    from upfeat import backbones
    try:
        backbones.create("mobilenetv2")
    except backbones.MissingWheelError as e:
        pytest.skip(str(e))
    save_untrained_model(tmp_path / "any.safetensors", residual=False, steps=5)
    grids = []
    real_save_grid = figure.save_grid
    monkeypatch.setattr(figure, "save_grid", lambda rows, path, **kw: (
        grids.append((rows, kw)), real_save_grid(rows, path, **kw)))
    r = demo("--images", str(data_dir / "samples" / PHOTOS[0]), "--checkpoint",
             str(tmp_path / "any.safetensors"), "--backbone", "vits14_focus", "--backbone",
             "mobilenetv2", "--out", str(tmp_path / "d.png"), "--max-side", "112")
    assert r.exit_code == 0, r.output
    (rows, kw), = grids
    assert [t[1] for t in kw["titles"]] == ["low-res vits14_focus", "low-res mobilenetv2"]
    low_vit, low_cnn = rows[0][1], rows[1][1]
    assert low_vit.shape == low_cnn.shape == (3, 75, 112)
    # one colour per 14-px cell in the ViT row, per 32-px cell in the CNN row
    assert torch.equal(low_cnn[:, :32, :32], low_cnn[:, :1, :1].expand(3, 32, 32))
    assert not torch.equal(low_vit[:, :32, :32], low_vit[:, :1, :1].expand(3, 32, 32))
