"""``upfeat serve``: the HTTP endpoints (urllib, no browser) and the page in headless Chromium.

One server per module (port 0, 1 MB upload limit, images downscaled to 320 px) runs in a thread;
the browser part needs Selenium and Debian's ``chromium`` + ``chromium-driver`` and is skipped,
saying so, without them. Nothing is downloaded at run time.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from upfeat.cli import app
from upfeat.demo import Demo, DemoSettings, upsampler_choices
from upfeat.serve import DemoServer, make_server

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
def server(focus_ok) -> DemoServer:
    srv = make_server(port=0, max_upload_mb=LIMIT_MB, max_side=SIDE, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(srv: DemoServer, body: bytes, **query: str) -> tuple[int, dict]:
    """POST ``body`` to /api/run; (status, JSON answer) also for error statuses."""
    q = "&".join(f"{k}={v}" for k, v in query.items())
    req = urllib.request.Request(f"{srv.url}api/run?{q}", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def png(data_url: str) -> np.ndarray:
    head, b64 = data_url.split(",", 1)
    assert head == "data:image/png;base64"
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG" and img.mode == "RGB"
    return np.asarray(img)


def test_page_and_options(server):
    with urllib.request.urlopen(server.url, timeout=10) as r:
        page = r.read().decode()
    assert r.headers["Content-Type"].startswith("text/html") and "<title>upfeat demo" in page
    with urllib.request.urlopen(server.url + "api/options", timeout=10) as r:
        opts = json.load(r)
    assert opts["backbones"][0] == "vits14_focus" == opts["default_backbone"]
    assert opts["upsamplers"]["vits14_focus"][:3] == ["nearest", "bilinear", "bicubic"]
    assert opts["max_side"] == SIDE and opts["max_upload_mb"] == LIMIT_MB
    assert server.server_address[0] == "127.0.0.1"


def test_run_downscales_and_aligns(server, data_dir):
    """A 1024x512 photo comes back as 320x160 image | low-res | upsampled PNGs; with ``nearest``
    the upsampled map equals the low-res one drawn cell by cell (same PCA colours, aligned)."""
    raw = (data_dir / BIRD).read_bytes()
    status, r = post(server, raw, backbone="vits14_focus", upsampler="nearest")
    assert status == 200, r
    assert r["size"] == [320, 160] and r["original_size"] == [1024, 512]
    assert r["grid"] == [12, 23] and r["dim"] == 384  # ceil(160 / 14), ceil(320 / 14)
    image, low, high = (png(r[k]) for k in ("image", "lowres", "upsampled"))
    assert image.shape == low.shape == high.shape == (160, 320, 3)
    ref = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB").resize((320, 160), Image.BICUBIC))
    assert np.abs(image.astype(int) - ref).mean() < 3  # the photo itself, downscaled
    np.testing.assert_array_equal(high, low)
    assert len(np.unique(low.reshape(-1, 3), axis=0)) > 50  # real features, not a flat colour
    assert all(r["timing_ms"][k] >= 0 for k in ("load", "backbone", "upsampler", "render"))

    status, b = post(server, raw, upsampler="bilinear")
    assert status == 200 and b["upsampler"] == "bilinear"
    low_b, high_b = png(b["lowres"]), png(b["upsampled"])
    np.testing.assert_array_equal(low_b, low)  # same backbone, same colours
    assert (high_b != low_b).any(axis=2).mean() > 0.3  # smooth, not blocky


@pytest.mark.parametrize("body, query, status, message", [
    (b"just some text", {}, 400, "cannot read 'notes.txt': not an image (unrecognised format)"),
    ("truncated", {}, 400, "truncated or corrupt"),
    (b"", {}, 400, "empty upload"),
    ("photo", {"backbone": "dinov2_vitg14"}, 400, "unknown backbone 'dinov2_vitg14'; offered: vits14_focus"),
    ("photo", {"upsampler": "/etc/passwd"}, 400, "upsampler '/etc/passwd' is not available"),
])
def test_bad_requests(server, data_dir, body, query, status, message):
    raw = (data_dir / ASTRONAUT).read_bytes()
    body = {"truncated": raw[: len(raw) // 3], "photo": raw}.get(body, body)
    got, r = post(server, body, name="notes.txt", **query)
    assert got == status and message in r["error"] and "\n" not in r["error"]


def test_jbu_when_shipped(server, data_dir):
    if "jbu" not in upsampler_choices("vits14_focus"):
        status, r = post(server, b"x", upsampler="jbu")
        assert status == 400 and "'jbu' is not available" in r["error"]
        pytest.skip("vits14_focus_jbu checkpoint not in upfeat/weights yet: jbu is not offered")
    status, r = post(server, (data_dir / BIRD).read_bytes(), upsampler="jbu")
    assert status == 200, r
    assert png(r["upsampled"]).shape == (160, 320, 3)


def test_jbu_offered_once_its_checkpoint_exists(server, data_dir, tmp_path, monkeypatch):
    """An (untrained) ``vits14_focus_jbu`` dropped into the weights folder is offered and runs."""
    import upfeat.model
    from upfeat.checkpoint import save_checkpoint
    from upfeat.upsamplers import create_upsampler

    up = create_upsampler("jbu_stack", dim=384, stride=14)
    save_checkpoint(tmp_path / "vits14_focus_jbu.safetensors",
                    {f"upsampler.{k}": v for k, v in up.state_dict().items()},
                    {"upsampler": up.config(),
                     "backbone": {"name": "vits14_focus", "dim": 384, "stride": 14}})
    monkeypatch.setattr(upfeat.model, "_WEIGHTS", tmp_path)
    with urllib.request.urlopen(server.url + "api/options", timeout=10) as r:
        assert json.load(r)["upsamplers"]["vits14_focus"] == ["nearest", "bilinear", "bicubic", "upsample_anything", "jbu"]
    demo = Demo(DemoSettings(max_side=96), backbones=["vits14_focus"])
    r = demo.run((data_dir / BIRD).read_bytes(), "vits14_focus", "jbu")
    assert r["upsampler"] == "jbu" and png(r["upsampled"]).shape == (48, 96, 3)


def test_oversized_upload_is_refused(server):
    big = bytes(int(1.5 * LIMIT_MB * 1_000_000))
    status, r = post(server, big)
    assert status == 413 and "upload is 1.5 MB, over the 1 MB limit" in r["error"]
    # With Expect: 100-continue the server answers 413 before any of the body is sent.
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    conn.putrequest("POST", "/api/run")
    conn.putheader("Content-Length", str(50 * 1_000_000))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "50.0 MB" in json.load(resp)["error"]
    conn.close()
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)  # no length at all
    conn.putrequest("POST", "/api/run")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.load(resp)["error"]
    conn.close()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "nothing-here", timeout=10)
    assert e.value.code == 404


def test_model_cache_is_lru(focus_ok, data_dir):
    demo = Demo(DemoSettings(max_side=64, cache_size=2), backbones=["vits14_focus"])
    raw = (data_dir / ASTRONAUT).read_bytes()
    for up in ("nearest", "bilinear", "nearest", "bicubic"):
        demo.run(raw, "vits14_focus", up)
    assert demo.cached == [("vits14_focus", "nearest"), ("vits14_focus", "bicubic")]


def test_cli_serve_errors(server):
    r = CliRunner().invoke(app, ["serve", "--max-side", "3"])
    assert r.exit_code == 2 and "max_side must be at least 16" in r.output
    r = CliRunner().invoke(app, ["serve", "--port", str(server.server_address[1])])
    assert r.exit_code == 2 and "cannot listen on 127.0.0.1" in r.output


# --- the page in a real browser -------------------------------------------------------------

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
                "--window-size=1300,900"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=opts)  # a driver path: no Selenium Manager
    yield drv
    drv.quit()


def submit(drv, path: Path, upsampler: str = "bilinear", timeout: float = 90) -> str:
    """Choose ``path`` and ``upsampler``, press the button; the result's final state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    drv.find_element(By.ID, "file").send_keys(str(path))
    Select(drv.find_element(By.ID, "upsampler")).select_by_value(upsampler)
    result = drv.find_element(By.ID, "result")
    drv.execute_script("arguments[0].dataset.state = 'submitted'", result)
    drv.find_element(By.ID, "run").click()
    WebDriverWait(drv, timeout).until(lambda d: result.get_attribute("data-state") in ("done", "error"))
    return result.get_attribute("data-state")


def test_page_in_chromium(server, browser, data_dir, tmp_path):
    from selenium.webdriver.common.by import By

    drv = browser
    drv.get(server.url)
    options = [o.text for o in drv.find_elements(By.CSS_SELECTOR, "#upsampler option")]
    assert options[:3] == ["nearest", "bilinear", "bicubic"]
    assert f"longer side is at most {SIDE} px" in drv.find_element(By.ID, "note").text
    for name, size in ((ASTRONAUT, (SIDE, SIDE)), ("samples/skimage/coffee.jpg", (SIDE, 213))):
        assert submit(drv, data_dir / name) == "done", drv.find_element(By.ID, "error").text
        for key in ("out-image", "out-lowres", "out-upsampled"):
            img = drv.find_element(By.ID, key)
            assert img.get_attribute("src").startswith("data:image/png;base64,")
            assert png(img.get_attribute("src")).shape == (size[1], size[0], 3)
            shown = drv.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight, "
                                       "arguments[0].complete]", img)
            assert shown == [*size, True]  # decoded by the browser, right aspect ratio
        assert drv.find_element(By.ID, "status").text.startswith("Done in")

    notes = tmp_path / "notes.jpg"
    notes.write_text("not a picture")
    assert submit(drv, notes) == "error"
    assert drv.find_element(By.ID, "error").text == \
        "cannot read 'notes.jpg': not an image (unrecognised format)"
    assert not drv.find_elements(By.ID, "out-image")  # the previous result is gone

    big = tmp_path / "big.png"
    big.write_bytes(bytes(int(1.2 * LIMIT_MB * 1_000_000)))
    assert submit(drv, big) == "error"
    assert "over the 1 MB upload limit" in drv.find_element(By.ID, "error").text
