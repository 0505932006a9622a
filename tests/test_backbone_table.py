"""benchmarks/backbone_table.py: rows, gains over bilinear, DAVIS columns from another run, and the
exit code of the "shared JBU beats bilinear everywhere" check."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ._utils import load_benchmark


def _script():
    return load_benchmark("backbone_table")


def _write(path: Path, **datasets) -> None:
    key = {"camvid": "miou", "davis": "fg_iou"}
    res = {ds: {"rows": [{"label": lb, "metrics": {key[ds]: v, f"{key[ds]}_d3": v / 2}}
                         for lb, v in rows.items()],
                "meta": {"train images": 9, "eval images": 8}} for ds, rows in datasets.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": res}))


def test_table_gains_and_davis_override(tmp_path, monkeypatch, capsys):
    m = _script()
    monkeypatch.setattr(m, "RESULTS", tmp_path)
    _write(tmp_path / "eval_table.json", camvid={"bilinear": 0.50, "jbu": 0.52},
           davis={"bilinear": 0.60, "bicubic": 0.61, "jbu": 0.63})
    _write(tmp_path / "cnn" / "eval_table.json", camvid={"bilinear": 0.30, "jbu": 0.31},
           davis={"bilinear": 0.15, "jbu": 0.14})  # the JBU below bilinear on DAVIS
    out = tmp_path / "t.md"
    argv = ["backbone_table.py", "--backbones", "vits14_focus,cnn", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert m.main() == 1
    assert "does not beat bilinear on: cnn" in capsys.readouterr().err
    text = out.read_text()
    assert "| `cnn` | `jbu` | 31.00 (+1.00) | 15.50 (+0.50) | 14.00 (-1.00) | 7.00 (-0.50) |" in text
    # DAVIS from runs on more frames: the CNN's JBU now ahead; rows missing there show "–"
    _write(tmp_path / "all" / "vits14_focus" / "eval_table.json", davis={"bilinear": 0.58, "jbu": 0.62})
    _write(tmp_path / "all" / "cnn" / "eval_table.json", davis={"bilinear": 0.12, "jbu": 0.14})
    monkeypatch.setattr(sys, "argv", argv + ["--davis-from", "all"])
    assert m.main() == 0
    text = out.read_text()
    assert "| `cnn` | `jbu` | 31.00 (+1.00) | 15.50 (+0.50) | 14.00 (+2.00) | 7.00 (+1.00) |" in text
    assert "| `vits14_focus` | `bicubic` | – | – | – | – |" in text
    assert "| `vits14_focus` | `jbu` | 52.00 (+2.00) | 26.00 (+1.00) | 62.00 (+4.00) | 31.00 (+2.00) |" in text
    # a backbone without its DAVIS run: one line and exit code 2
    (tmp_path / "all" / "cnn" / "eval_table.json").unlink()
    assert m.main() == 2
    assert "missing" in capsys.readouterr().err
