"""Result files: a Markdown + JSON table, a bar chart PNG and a qualitative figure PNG.

Rows are dicts ``{"label", "metrics": {...}, "seconds": {...}, "fit": {...}}`` (what
:meth:`upfeat.eval.probe.ProbeResult.to_dict` gives), optionally with the ``"spec"`` the row was
built from (e.g. ``resize_conv=runs/rc``). Scores in [0, 1] are shown in % in the
Markdown; the JSON keeps the raw values, except NaN (no pixel to score, e.g. no boundary band),
which is ``null`` in the JSON (NaN is not valid JSON) and ``–`` in the Markdown. matplotlib is imported inside :func:`bar_chart` only
(the grid figure goes through :func:`upfeat.viz.save_grid`).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

# metric key, header, scale, format; first entry = the bar chart's metric. "_d3" / "_d8": the
# same score within 3 / 8 px of a ground-truth boundary (metrics.boundary_band), beside the full one.
COLUMNS: dict[str, list[tuple[str, str, float, str]]] = {
    "seg": [("miou", "mIoU (%)", 100, ".2f"), ("miou_d3", "boundary mIoU d=3 (%)", 100, ".2f"),
            ("miou_d8", "boundary mIoU d=8 (%)", 100, ".2f"),
            ("pixel_acc", "pixel acc (%)", 100, ".2f")],
    "fgbg": [("fg_iou", "fg IoU (%)", 100, ".2f"),
             ("fg_iou_d3", "boundary fg IoU d=3 (%)", 100, ".2f"),
             ("fg_iou_d8", "boundary fg IoU d=8 (%)", 100, ".2f"), ("miou", "mIoU (%)", 100, ".2f"),
             ("pixel_acc", "pixel acc (%)", 100, ".2f")],
    "depth": [("rmse", "RMSE (m) ↓", 1, ".4f"), ("delta1", "δ<1.25 (%)", 100, ".2f")],
    "cam": [("avg_drop", "A.D. (%) ↓", 1, ".2f"), ("avg_increase", "A.I. (%) ↑", 1, ".2f")],
}
# CamVid's customary colours (class ids 0..10); further ids get generated colours, void is black
PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
           (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]


def fmt_score(v: object, scale: float, fmt: str) -> str:
    """``v * scale`` formatted with ``fmt``; ``–`` for a missing (``None``) or NaN score."""
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v * scale, fmt)


def json_safe(obj: object) -> object:
    """``obj`` with every non-finite float replaced by ``None`` (dicts, lists, tuples walked)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def markdown_table(rows: Sequence[dict], task: str, timing: bool = True) -> str:
    """One line per row: label, the task's metrics, train pixels, L-BFGS iterations, seconds."""
    cols = COLUMNS[task]
    head = ["upsampler", *(c[1] for c in cols)]
    if timing:
        head += ["train px", "L-BFGS it.", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['label']}`", *(fmt_score(r["metrics"].get(k), s, f) for k, _, s, f in cols)]
        if timing:
            fit = r.get("fit", {})
            cells += [str(fit.get("train_pixels", "–")), str(fit.get("iterations", "–")),
                      f"{sum(r.get('seconds', {}).values()):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def class_iou_table(rows: Sequence[dict], class_names: Sequence[str]) -> str:
    """Per-class IoU (%) per row (segmentation); ``–`` = class absent from GT and prediction."""
    head = ["upsampler", *class_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ious = r["metrics"].get("iou", [])
        lines.append("| " + " | ".join([f"`{r['label']}`", *(fmt_score(v, 100, ".1f") for v in ious)]) + " |")
    return "\n".join(lines)


def bar_chart(rows: Sequence[dict], task: str, path: str | os.PathLike[str], title: str = "") -> Path:
    """PNG bar chart of the task's first metric per row (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, header, scale, _ = COLUMNS[task][0]
    labels = [r["label"] for r in rows]
    values = [float(r["metrics"].get(key, float("nan"))) * scale for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    bars = ax.bar(range(len(rows)), values, color="#4c72b0")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
    ax.set_ylabel(header)
    finite = [v for v in values if math.isfinite(v)]
    if finite:  # the axis starts at 0; the values are printed on the bars
        ax.set_ylim(0, max(finite) * 1.12 or 1)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(out_dir: str | os.PathLike[str], stem: str, task: str, rows: Sequence[dict],
                  meta: dict, notes: Sequence[str] = (),
                  class_names: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``eval_<stem>.md``, ``.json`` and ``.png`` (bar chart) in ``out_dir``; return paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"eval_{stem}.{ext}" for ext in ("md", "json", "png")}
    title = meta.get("title", stem)
    md = [f"# {title}", ""]
    md += [f"- {k}: {v}" for k, v in meta.items() if k != "title"]
    md += ["", markdown_table(rows, task)]
    if class_names and task == "seg" and rows:
        md += ["", "Per-class IoU (%):", "", class_iou_table(rows, class_names)]
    specs = [f"`{r['label']}` = `{r['spec']}`" for r in rows if r.get("spec", r["label"]) != r["label"]]
    if specs:
        md += ["", "Rows from checkpoints: " + ", ".join(specs)]
    if notes:
        md += ["", *(f"- {n}" for n in notes)]
    paths["md"].write_text("\n".join(md) + "\n")
    doc = json_safe({"meta": meta, "task": task, "rows": list(rows), "notes": list(notes)})
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if rows:
        bar_chart(rows, task, paths["png"], title)
    else:
        del paths["png"]
    return paths


def label_rgb(label: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """(H, W) class ids -> (3, H, W) colours in [0, 1]; the void id is black."""
    k = int(label.max()) + 1 if label.numel() else 1
    extra = [((37 * i) % 256, (101 * i) % 256, (173 * i) % 256) for i in range(len(PALETTE), k)]
    pal = torch.tensor(PALETTE + extra, dtype=torch.float32)[: max(k, 1)] / 255
    lab = label.long().clamp_min(0)
    rgb = pal[lab.clamp_max(len(pal) - 1)]
    if ignore_index is not None:
        rgb[label == ignore_index] = 0
    return rgb.permute(2, 0, 1)


def fgbg_rgb(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) {0, 1} -> (3, H, W): foreground white, background dark grey."""
    return (0.15 + 0.85 * (mask > 0).float())[None].expand(3, -1, -1).clone()


def depth_rgb(depth: torch.Tensor, vmax: float | None = None) -> torch.Tensor:
    """(H, W) metres -> (3, H, W) grey levels, near = bright; invalid (<= 0) black."""
    d = depth.float()
    if vmax is None:
        vmax = float(d[d > 0].max()) if (d > 0).any() else 1.0
    g = torch.where(d > 0, 1 - (d / vmax).clamp(0, 1) * 0.9, torch.zeros_like(d))
    return g[None].expand(3, -1, -1).clone()


def qualitative_figure(path: str | os.PathLike[str], panels: Sequence[dict],
                       labels: Sequence[str]) -> Path:
    """Grid PNG, two rows per image: ``image | PCA per upsampler`` over ``target | prediction per
    upsampler``. ``panels[i]`` = ``{"image", "target", "pca": [...], "pred": [...]}``, all (3, H, W)
    in [0, 1], lists in the order of ``labels``."""
    from ..viz import save_grid

    rows = []
    for p in panels:
        rows.append([p["image"], *p["pca"]])
        rows.append([p["target"], *p["pred"]])
    titles = ["image / target", *(f"{lab}: PCA / probe" for lab in labels)]
    save_grid(rows, path, titles=titles, cell_inches=2.4)
    return Path(path)
