"""``upfeat serve``: the demo logic (:class:`upfeat.apps.web_demo.Demo`, no UI) and the Gradio page in
headless Chromium.

The browser part needs Gradio (the ``demo`` extra), Selenium and Debian's ``chromium`` +
``chromium-driver``, and is skipped, saying so, without them. Nothing is downloaded at run time.
"""
from __future__ import annotations

import shutil
import socket
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from upfeat.apps.cli import app
from upfeat.apps.web_demo import Demo, DemoError, DemoSettings, upsampler_choices

SIDE, LIMIT_MB = 320, 1
ASTRONAUT, BIRD = "samples/skimage/astronaut.jpg", "samples/featup/bird_full.jpg"  # 512², 1024x512


@pytest.fixture(scope="module")
def focus_ok() -> None:
    from upfeat import backbones
    from upfeat.backbones import focus

    try:
        focus.find_onnx()
    except ImportError:
        if not (backbones.cache_dir() / focus.CACHE_FILE).is_file():
            pytest.skip(f"vits14_focus weights unavailable: {focus.INSTALL}")


@pytest.fixture(scope="module")
def demo(focus_ok) -> Demo:
    return Demo(DemoSettings(max_side=SIDE), backbones=["vits14_focus"])


def test_run_downscales_and_aligns(demo, data_dir):
    """A 1024x512 photo comes back as 320x160 image | low-res | upsampled pictures; with
    ``nearest`` the upsampled map equals the low-res one drawn cell by cell (same PCA colours)."""
    r = demo.run(data_dir / BIRD, "vits14_focus", "nearest")
    assert r.size == (320, 160) and r.original_size == (1024, 512)
    assert r.grid == (12, 23) and r.dim == 384  # ceil(160 / 14), ceil(320 / 14)
    assert r.image.shape == r.lowres.shape == r.upsampled.shape == (160, 320, 3)
    assert r.image.dtype == np.uint8
    ref = np.asarray(Image.open(data_dir / BIRD).convert("RGB").resize((320, 160), Image.BICUBIC))
    assert np.abs(r.image.astype(int) - ref).mean() < 3  # the photo itself, downscaled
    np.testing.assert_array_equal(r.upsampled, r.lowres)
    assert len(np.unique(r.lowres.reshape(-1, 3), axis=0)) > 50  # real features, not flat
    assert all(r.timing_ms[k] >= 0 for k in ("load", "backbone", "upsampler", "render"))
    assert r.summary().startswith("Done in ") and "23 x 12 x 384" in r.summary()

    b = demo.run(data_dir / BIRD, "vits14_focus", "bilinear")
    np.testing.assert_array_equal(b.lowres, r.lowres)  # same backbone, same colours
    assert (b.upsampled != b.lowres).any(axis=2).mean() > 0.3  # smooth, not blocky


@pytest.mark.parametrize("body, backbone, upsampler, message", [
    (b"just some text", "vits14_focus", "bilinear",
     "cannot read 'notes.txt': not an image (unrecognised format)"),
    ("truncated", "vits14_focus", "bilinear", "truncated or corrupt"),
    ("photo", "dinov2_vitg14", "bilinear", "unknown backbone 'dinov2_vitg14'; offered: vits14_focus"),
    ("photo", "vits14_focus", "/etc/passwd", "upsampler '/etc/passwd' is not available"),
])
def test_bad_requests(demo, data_dir, tmp_path, body, backbone, upsampler, message):
    raw = (data_dir / ASTRONAUT).read_bytes()
    path = tmp_path / "notes.txt"
    path.write_bytes({"truncated": raw[: len(raw) // 3], "photo": raw}.get(body, body))
    with pytest.raises(DemoError) as e:
        demo.run(path, backbone, upsampler)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DemoError, match="no image: upload one"):
        demo.run(None, "vits14_focus", "bilinear")


def test_jbu_offered_once_its_checkpoint_exists(focus_ok, data_dir, tmp_path, monkeypatch):
    """An (untrained) agnostic JBU dropped into the weights folder is offered and runs."""
    import upfeat.model
    from upfeat.checkpoint import save_checkpoint
    from upfeat import upsamplers

    monkeypatch.setattr(upfeat.upsamplers.pretrained, "WEIGHTS", tmp_path)
    assert "jbu" not in upsampler_choices("vits14_focus")
    up = upsamplers.create("jbu_stack", dim=384, stride=14, steps=5, residual=False)
    save_checkpoint(tmp_path / "jbu.safetensors",
                    {f"upsampler.{k}": v for k, v in up.state_dict().items()},
                    {"upsampler": up.config(),
                     "backbone": {"name": "vits14_focus", "dim": 384, "stride": 14}})
    assert upsampler_choices("vits14_focus") == ["nearest", "bilinear", "bicubic",
                                                 "upsample_anything", "jbu"]
    r = Demo(DemoSettings(max_side=96), backbones=["vits14_focus"]).run(
        data_dir / BIRD, "vits14_focus", "jbu")
    assert r.upsampler == "jbu" and r.upsampled.shape == (48, 96, 3)


def test_model_cache_is_lru(focus_ok, data_dir):
    demo = Demo(DemoSettings(max_side=64, cache_size=2), backbones=["vits14_focus"])
    for up in ("nearest", "bilinear", "nearest", "bicubic"):
        demo.run(data_dir / ASTRONAUT, "vits14_focus", up)
    assert demo.cached == [("vits14_focus", "nearest"), ("vits14_focus", "bicubic")]


def test_cli_serve_errors(monkeypatch):
    r = CliRunner().invoke(app, ["serve", "--max-side", "3"])
    assert r.exit_code == 2 and "max_side must be at least 16" in r.output
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the demo extra were not installed
    r = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert r.exit_code == 2
    assert r.stderr == 'error: the web demo needs Gradio: pip install -e ".[demo]"\n'


# --- the Gradio page in a real browser ------------------------------------------------------

@pytest.fixture(scope="module")
def server(focus_ok, data_dir):
    """The app on a free port of 127.0.0.1, in this process (no share link, no analytics)."""
    pytest.importorskip("gradio", reason='Gradio is not installed (pip install -e ".[demo]")')
    from upfeat.apps.serve import launch

    demo = Demo(DemoSettings(max_side=SIDE), backbones=["vits14_focus"])
    gr_app, url = launch(port=0, max_upload_mb=LIMIT_MB, examples=[data_dir / ASTRONAUT],
                         block=False, quiet=True, demo=demo)
    yield url
    gr_app.close()


def test_server_is_local_and_port_checked(server):
    assert server.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server, timeout=30) as r:
        assert r.status == 200 and "upfeat demo" in r.read().decode()
    port = int(server.rstrip("/").rsplit(":", 1)[1])
    r = CliRunner().invoke(app, ["serve", "--port", str(port)])  # taken: by the app above
    assert r.exit_code == 2 and r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    r = CliRunner().invoke(app, ["serve", "--port", "80000"])
    assert r.exit_code == 2 and "--port must be between 0 and 65535" in r.stderr


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Selenium, from the system packages; never downloads one."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1300,1000"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=opts)  # a driver path: no Selenium Manager
    yield drv
    drv.quit()


def _choose(drv, dropdown: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    drv.find_element(By.CSS_SELECTOR, f"#{dropdown} input").click()
    drv.find_element(By.CSS_SELECTOR, f"#{dropdown} li[aria-label='{value}']").click()


def _natural_size(drv, css: str) -> list:
    from selenium.webdriver.common.by import By
    img = drv.find_element(By.CSS_SELECTOR, css)
    return drv.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight, "
                              "arguments[0].complete]", img)


def test_page_in_chromium(server, browser, data_dir, tmp_path):
    """Upload a photo, pick bilinear, run: the three pictures appear at the downscaled size, with
    the time taken; a file that is not an image gives its one-line reason."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    drv = browser
    drv.get(server)
    # Gradio renders its components one by one: the run button may be there before the upload's
    # file input (a CI run failed on exactly that), so wait for both
    WebDriverWait(drv, 60).until(lambda d: d.find_elements(By.ID, "run") and d.find_elements(
        By.CSS_SELECTOR, "#upload input[type=file]"))
    assert f"longer side is at most {SIDE} px" in drv.find_element(By.ID, "note").text
    drv.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(data_dir / BIRD))
    WebDriverWait(drv, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload img"))
    _choose(drv, "upsampler", "bilinear")
    drv.find_element(By.ID, "run").click()
    WebDriverWait(drv, 120).until(
        lambda d: d.find_element(By.ID, "status").text.startswith("Done in"))
    for key in ("image", "lowres", "upsampled"):
        WebDriverWait(drv, 30).until(lambda d: _natural_size(d, f"#out-{key} img") == [320, 160, True])
    status = drv.find_element(By.ID, "status").text
    assert "bilinear upsampled to 320 x 160" in status and "from 1024 x 512" in status

    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    drv.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Remove Image']").click()
    WebDriverWait(drv, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    drv.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(notes))
    drv.find_element(By.ID, "run").click()
    toast = "[data-testid='toast-body']"
    WebDriverWait(drv, 60).until(lambda d: "cannot read" in " ".join(
        t.text for t in d.find_elements(By.CSS_SELECTOR, toast)))
    toast = drv.find_element(By.CSS_SELECTOR, toast).text
    assert toast.splitlines()[-1] == "cannot read 'notes.png': not an image (unrecognised format)"
    assert not drv.find_elements(By.CSS_SELECTOR, "#out-image img")  # the previous result is gone
    assert drv.find_element(By.ID, "status").text == ""

    big = tmp_path / "big.png"  # over the upload limit: refused before it reaches the model
    big.write_bytes(bytes(int(1.2 * LIMIT_MB * 1_000_000)))
    drv.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Remove Image']").click()
    WebDriverWait(drv, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    drv.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(big))
    WebDriverWait(drv, 30).until(lambda d: "exceed the maximum allowed size" in
                                 d.find_element(By.CSS_SELECTOR, "[data-testid='toast-body']").text)
    assert not drv.find_elements(By.CSS_SELECTOR, "#upload img")  # not uploaded
