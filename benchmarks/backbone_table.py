"""The backbone x upsampler table of docs/results.md, from the ``eval_table.py`` runs of each
backbone.

    for b in vits14_focus mobilenetv2 efficientnet_lite0 vgg16_hed; do
        python benchmarks/eval_table.py --backbone $b --rows nearest,bilinear,jbu ...; done
    python benchmarks/backbone_table.py        # -> benchmarks/results/backbone_table.md

Reads ``benchmarks/results/eval_table.json`` (``vits14_focus``) and
``benchmarks/results/<backbone>/eval_table.json``; one row per backbone and upsampler with CamVid
val mIoU and DAVIS val fg IoU (full image and boundary d = 3), and the gain of each learned row
over bilinear. Exit code 1 if a shared-JBU row does not beat bilinear on both datasets.

``--davis-from davis_all``: the DAVIS columns from ``benchmarks/results/davis_all/<backbone>/``
instead (runs on every frame, ``--datasets davis --davis-train 95 --davis-eval 99``; the CNNs'
default-folder runs used fewer frames to fit a session).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONES = ("vits14_focus", "mobilenetv2", "efficientnet_lite0", "vgg16_hed")
COLUMNS = (("camvid", "miou"), ("camvid", "miou_d3"), ("davis", "fg_iou"), ("davis", "fg_iou_d3"))


def scores(path: Path) -> tuple[dict[str, dict[str, float | None]], dict]:
    """label -> {"camvid.miou": ..., ...} (×100) of one eval_table.json, and its meta."""
    data = json.loads(path.read_text())
    out: dict[str, dict[str, float | None]] = {}
    for ds, key in COLUMNS:
        for row in data["results"].get(ds, {}).get("rows", []):
            v = row["metrics"].get(key)
            out.setdefault(row["label"], {})[f"{ds}.{key}"] = None if v is None else 100 * v
    meta = {ds: r.get("meta", {}) for ds, r in data["results"].items()}
    return out, meta


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--out", type=Path, default=RESULTS / "backbone_table.md")
    p.add_argument("--davis-from", default=None,
                   help="folder under benchmarks/results with <backbone>/eval_table.json DAVIS runs")
    args = p.parse_args()
    head = ("| backbone | upsampler | CamVid mIoU | CamVid boundary mIoU d=3 | DAVIS fg IoU | "
            "DAVIS boundary fg IoU d=3 |")
    md, failures, setups = [head, "|---|---|---|---|---|---|"], [], []
    for name in args.backbones.split(","):
        path = RESULTS / "eval_table.json" if name == "vits14_focus" else RESULTS / name / "eval_table.json"
        if not path.is_file():
            print(f"missing {path}: run benchmarks/eval_table.py --backbone {name} first", file=sys.stderr)
            return 2
        rows, meta = scores(path)
        if args.davis_from:
            other = RESULTS / args.davis_from / name / "eval_table.json"
            if not other.is_file():
                print(f"missing {other}: run benchmarks/eval_table.py --backbone {name} --datasets "
                      f"davis --out {other.parent} first", file=sys.stderr)
                return 2
            drows, dmeta = scores(other)
            for label in [*rows, *(lb for lb in drows if lb not in rows)]:  # DAVIS: the other run
                kept = {k: v for k, v in rows.get(label, {}).items() if not k.startswith("davis.")}
                rows[label] = {**kept, **{k: v for k, v in drows.get(label, {}).items()
                                          if k.startswith("davis.")}}
            meta["davis"] = dmeta.get("davis", {})
        setups.append(f"`{name}`: " + "; ".join(
            f"{ds} {m.get('train images')} train / {m.get('eval images')} eval images"
            for ds, m in meta.items()))
        base = rows.get("bilinear", {})
        for label, vals in rows.items():
            cells = []
            for ds, key in COLUMNS:
                v, b = vals.get(f"{ds}.{key}"), base.get(f"{ds}.{key}")
                gain = "" if label in ("bilinear", "nearest") or v is None or b is None else f" ({v - b:+.2f})"
                cells.append("–" if v is None else f"{v:.2f}{gain}")
            md.append(f"| `{name}` | `{label}` | " + " | ".join(cells) + " |")
            if label == "jbu" and any((vals.get(f"{ds}.{k}") or 0) <= (base.get(f"{ds}.{k}") or 0)
                                      for ds, k in (("camvid", "miou"), ("davis", "fg_iou"))):
                failures.append(name)
    text = "\n".join(md) + "\n\n" + "\n".join(f"- {s}" for s in setups) + "\n"
    args.out.write_text(text)
    print(text)
    if failures:
        print(f"the shared JBU does not beat bilinear on: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
