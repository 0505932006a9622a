"""The CLI's one error boundary (issue 15): user errors are one line with exit code 2, upfeat's
own errors share a base class, and UPFEAT_DEBUG=1 shows the traceback."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from upfeat._checks import ShapeError, UpfeatError
from upfeat.backbones import MissingWheelError, OfflineError
from upfeat.checkpoint import CheckpointError
from upfeat.apps.cli import app
from upfeat.apps.web_demo import DemoError
from upfeat.eval.features import UpsamplerUnavailable
from upfeat.io import ImageReadError


def test_upfeat_errors_share_a_base_and_keep_their_old_bases():
    for cls, old in ((ShapeError, ValueError), (OfflineError, RuntimeError),
                     (MissingWheelError, ImportError), (CheckpointError, ValueError),
                     (ImageReadError, ValueError), (UpsamplerUnavailable, ValueError),
                     (DemoError, Exception)):
        assert issubclass(cls, UpfeatError) and issubclass(cls, old), cls


@pytest.mark.parametrize("args, message", [
    (["serve", "--port", "80000"], "error: --port must be between 0 and 65535, got 80000"),
    (["implicit", "nowhere.png", "--out", "x.safetensors"], "error: "),
    (["eval", "probe", "--data", "nowhere", "--upsampler", "bilinear"], "error: "),
])
def test_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UPFEAT_DEBUG", raising=False)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.output


def test_upfeat_debug_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("UPFEAT_DEBUG", "1")
    r = CliRunner().invoke(app, ["serve", "--port", "80000"])
    assert isinstance(r.exception, ValueError) and "--port must be" in str(r.exception)


def test_minor_reproductions():
    """Issue 15, minor: load("") never reads the current directory; --max-memory 150% refused."""
    import upfeat
    from upfeat.inference.memory import parse_bytes
    with pytest.raises(CheckpointError, match="empty checkpoint name"):
        upfeat.load("")
    with pytest.raises(ValueError, match="at most 100%"):
        parse_bytes("150%")
    assert parse_bytes("100%") > 0
