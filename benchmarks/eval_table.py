"""Reproduce the evaluation tables of docs/results.md: linear probes on a backbone's
features.

    python benchmarks/eval_table.py                          # vits14_focus (CamVid seg + DAVIS fg/bg)
    python benchmarks/eval_table.py --backbone mobilenetv2   # any registered backbone

Rows: nearest, bilinear, bicubic, resize_conv, large_image, upsample_anything, jbu (``--rows``).
``upsample_anything`` is the training-free peer (arXiv 2511.16301), fitted on every train and eval
image (50 Adam steps; see ``benchmarks/results/upsample_anything.md`` for its cost). ``implicit`` is
accepted too (skipped with a note when ``upfeat.upsamplers.implicit`` is absent), but it fits one
network per train and eval image (its fast schedule: ~25 CPU-seconds per 224 x 294 image on one
thread), far beyond this budget on a CPU: use it with small ``--camvid-train`` / ``--camvid-eval``.

- ``jbu``: the shipped backbone-agnostic JBU (``--jbu PATH`` for another); skipped with a note if
  it cannot be loaded. Any row may also be a spec such as ``jbu=vits14_focus_jbu`` (the older
  ViT-S/14-only checkpoint) or ``jbu=runs/X`` (see :mod:`upfeat.eval.features`).
- ``resize_conv``: ``--resize-conv PATH``, a checkpoint file or an ``upfeat train`` run folder.
  A folder without ``model.safetensors`` (by default ``<UPFEAT_CACHE>/eval_resize_conv``, i.e.
  ``~/.cache/upfeat/eval_resize_conv``) is first trained with ``upfeat.train``:
  ``--resize-conv-steps`` steps on the CamVid train images and the DAVIS train sequences (no
  labels), included in the reported time; later runs reuse it. A 1x1 conv (the paper's 1x1/3x3
  resize-conv): a 3x3 conv on 384 channels at full resolution costs ~3 s per 224 x 294 image on
  one core, 4x the 1x1 conv. For a longer-trained one: ``upfeat train --upsampler resize_conv
  --upsampler-args '{"kernel_size": 1}' --data ... --out DIR`` and ``--resize-conv DIR``.

Protocol (:mod:`upfeat.eval.probe`, identical for every row): evenly spaced train images
(``--camvid-train`` of 367 CamVid, ``--davis-train`` of the 95 frames of the 7 DAVIS train
sequences), 1500 random non-void pixels per train image (seed 0), standardised features, full-batch
L-BFGS from zero for ``--max-iter`` iterations with the per-task weight decay (seg 1e-4, fg/bg
0.1, chosen once on the ViT's bilinear features: :mod:`upfeat.eval.probe`) or, with
``--weight-decay cv``, one chosen per backbone and dataset from 1e-4 / 1e-3 / 1e-2 / 0.1 by 3-fold
cross-validation over the *train* sequences on bilinear features (:mod:`upfeat.eval.cv`), the
same for every row; then every pixel of the eval images (all
101 CamVid val images; ``--davis-eval`` of the 99 frames of the 7 DAVIS val sequences). Backbone
features are computed once per image and size and shared by all rows; each row computes its
upsampled features once per image (the figures reuse them).

Cost (CPU seconds on one thread, measured with ``time.process_time``, i.e. a quiet core):
per image, backbone 0.26 (CamVid 224 x 294) / 0.30 (DAVIS 224 x 392); per row and image, nearest
0.06 / 0.08, bilinear 0.08 / 0.15, bicubic 0.25 / 0.33, resize_conv (1x1) 0.52 / 0.75,
large_image 1.35 / 2.05, jbu 0.72 / 0.87; one L-BFGS step on 180k CamVid pixels 0.16; one
resize_conv training step 3.3. Defaults: CamVid 221 images x 3.3 s + 6 fits x ~33 s = ~16 min,
DAVIS 96 images x 4.6 s + fits = ~8 min, resize_conv training (60 steps) ~3.5 min: ~28 min on
one thread (a run with 44 CamVid + 24 DAVIS images took 301 CPU s, this model predicts 313 s);
two threads (torch's default on this 2-core machine) are faster, not measured on a quiet machine.
``--cam`` adds ~1 s per CamVid image and row.

Evaluation size: 224 pixels high (16 patches, ViT-S/14's pre-training scale), width the multiple
of 14 closest to the aspect ratio (no padding, < 2 % anisotropic squeeze): CamVid 360 x 480 ->
224 x 294, DAVIS 480 x 854 -> 224 x 392. ``large_image`` runs the backbone at 2x that.

Metrics: CamVid mIoU and pixel accuracy, DAVIS fg IoU, each also as a boundary score over the
pixels within d = 3 and 8 px (at the evaluation size) of a ground-truth class boundary
(:func:`upfeat.eval.metrics.boundary_band`).

Writes, in ``--out`` (default ``benchmarks/results``): ``eval_seg_camvid_val.*`` and
``eval_fgbg_davis_val.*`` (``.md``, ``.json``, bar chart ``.png``, ``_examples.png``),
``eval_cam_camvid_val.*`` with ``--cam``, and the combined ``eval_table.{md,json}``. Exit code 1 if
bilinear does not beat nearest (a sanity check, on the full-image metric) on a dataset.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import upfeat
from upfeat.eval.cache import CachedBackbone, FeatureCache
from upfeat.eval.cv import CV_META, parse_weight_decay
from upfeat.eval.datasets import davis_split
from upfeat.eval.report import fmt_score, json_safe
from upfeat.eval.suite import cam_suite, probe_suite

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results"
RC_DEFAULT = upfeat.backbones.cache_dir() / "eval_resize_conv"
ROWS = "nearest,bilinear,bicubic,resize_conv,large_image,upsample_anything,jbu"
SIZES = {"camvid": (224, 294), "davis": (224, 392)}
# first = the sanity check's metric; "_d3" / "_d8": within 3 / 8 px of a ground-truth boundary
METRICS = {"camvid": [("miou", "CamVid mIoU (%)"), ("miou_d3", "CamVid boundary mIoU d=3 (%)"),
                      ("miou_d8", "CamVid boundary mIoU d=8 (%)"),
                      ("pixel_acc", "CamVid pixel acc (%)")],
           "davis": [("fg_iou", "DAVIS fg IoU (%)"), ("fg_iou_d3", "DAVIS boundary fg IoU d=3 (%)"),
                     ("fg_iou_d8", "DAVIS boundary fg IoU d=8 (%)")]}


def train_resize_conv(out: Path, steps: int, progress: bool = True,
                      backbone: str = "vits14_focus") -> tuple[Path, float]:
    """Train a 1x1 resize-conv on CamVid train images + DAVIS train sequences (no labels used)."""
    from upfeat.train import TrainConfig, fit

    seqs = davis_split([p.name for p in (DATA / "davis" / "images").iterdir() if p.is_dir()], "train")
    data = [str(DATA / "camvid" / "train" / "images"), *(str(DATA / "davis" / "images" / s) for s in seqs)]
    cfg = TrainConfig(data=data, out=str(out), backbone=backbone, upsampler="resize_conv",
                      upsampler_kwargs={"kernel_size": 1}, steps=steps, batch_size=2, views=2,
                      warmup=min(20, steps), ckpt_every=max(steps // 4, 1), accelerator="cpu",
                      seed=0, resume=True, progress=progress)
    print(f"== training resize_conv ({steps} steps) into {out}", flush=True)
    t = time.perf_counter()
    path = fit(cfg)
    return path, time.perf_counter() - t


def combined_table(results: dict[str, dict]) -> str:
    """Markdown: one line per upsampler, the datasets' main metrics, then seconds per dataset."""
    labels = list(dict.fromkeys(r["label"] for res in results.values() for r in res["rows"]))
    rows = {name: {r["label"]: r for r in res["rows"]} for name, res in results.items()}
    cols = [(name, key, head) for name in results for key, head in METRICS[name]]
    head = ["upsampler", *(c[2] for c in cols), *(f"{n} time (s)" for n in results)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab in labels:
        cells = [f"`{lab}`"]
        for name, key, _ in cols:
            r = rows[name].get(lab)
            cells.append(fmt_score(r["metrics"].get(key), 100, ".2f") if r else "–")
        for name in results:
            r = rows[name].get(lab)
            cells.append(f"{sum(r['seconds'].values()):.0f}" if r else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sanity(results: dict[str, dict]) -> list[str]:
    """Failures of "bilinear beats nearest" on each dataset's main metric."""
    bad = []
    for name, res in results.items():
        key = METRICS[name][0][0]
        m = {r["label"]: r["metrics"][key] for r in res["rows"]}
        if {"nearest", "bilinear"} <= set(m) and not m["bilinear"] > m["nearest"]:
            bad.append(f"{name}: bilinear {key} {m['bilinear']:.4f} <= nearest {m['nearest']:.4f}")
    return bad


def _weight_decay_arg(text: str) -> float | str | None:
    """``--weight-decay``: ``default`` (None), ``cv`` or a number >= 0."""
    try:
        return None if text == "default" else parse_weight_decay(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=ROWS, help=f"comma-separated upsamplers (default {ROWS})")
    p.add_argument("--datasets", default="camvid,davis", help="camvid, davis or both")
    p.add_argument("--camvid-train", type=int, default=120, help="CamVid train images (of 367)")
    p.add_argument("--camvid-eval", type=int, default=None, help="CamVid val images (default all 101)")
    p.add_argument("--davis-train", type=int, default=48, help="DAVIS train frames (of 95)")
    p.add_argument("--davis-eval", type=int, default=48, help="DAVIS val frames (of 99)")
    p.add_argument("--max-iter", type=int, default=200, help="L-BFGS iterations of every probe")
    p.add_argument("--weight-decay", default=None, metavar="{default,cv,NUMBER}",
                   type=_weight_decay_arg,
                   help="probe weight decay: 'default' (seg 1e-4, fg/bg 0.1), 'cv' (per backbone "
                        "and dataset, by cross-validation over train sequences on bilinear "
                        "features) or a number")
    p.add_argument("--backbone", default="vits14_focus", help="registered backbone name")
    p.add_argument("--jbu", default=None, help="checkpoint of the 'jbu' row (default: the shipped one)")
    p.add_argument("--resize-conv", type=Path, default=RC_DEFAULT,
                   help="resize_conv checkpoint or run folder (trained there first if it has no model)")
    p.add_argument("--resize-conv-steps", type=int, default=60,
                   help="training steps when the resize_conv run folder has no model yet")
    p.add_argument("--cam", action="store_true", help="also CAM faithfulness on CamVid")
    p.add_argument("--show", type=int, default=3, help="images in each qualitative figure")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results, /<backbone> for the others)")
    p.add_argument("--merge", action="store_true",
                   help="keep the results of datasets not in --datasets from --out/eval_table.json "
                        "(an earlier run; noted in the table)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args()

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    specs = args.rows.split(",")
    if "resize_conv" in specs:
        ckpt = args.resize_conv
        if args.backbone != "vits14_focus" and ckpt == RC_DEFAULT:  # one per backbone
            ckpt = ckpt.with_name(f"{ckpt.name}_{args.backbone}")
        if not ckpt.is_file() and not (ckpt / "model.safetensors").is_file():
            ckpt, seconds["train resize_conv"] = train_resize_conv(ckpt, args.resize_conv_steps,
                                                                   args.progress, args.backbone)
        specs[specs.index("resize_conv")] = f"resize_conv={ckpt}"
    if "jbu" in specs and args.jbu:
        specs[specs.index("jbu")] = f"jbu={args.jbu}"
    if args.out is None:  # one folder per backbone, the default one's at the top
        args.out = OUT if args.backbone == "vits14_focus" else OUT / args.backbone

    bb = CachedBackbone(upfeat.backbones.create(args.backbone), FeatureCache(memory_mb=3072))
    counts = {"camvid": (args.camvid_train, args.camvid_eval), "davis": (args.davis_train, args.davis_eval)}
    results = {}
    for name in args.datasets.split(","):
        t = time.perf_counter()
        print(f"== {name} {SIZES[name]}: {', '.join(specs)}", flush=True)
        results[name] = probe_suite(DATA / name, specs, backbone=bb, size=SIZES[name],
                                    out=args.out, max_iter=args.max_iter, show=args.show,
                                    weight_decay=args.weight_decay,
                                    max_train=counts[name][0], max_eval=counts[name][1],
                                    progress=args.progress, log=print)
        seconds[name] = time.perf_counter() - t
        bb.cache.clear()  # the next dataset shares no image
    cam = {}
    if args.cam:
        t = time.perf_counter()
        print("== CAM faithfulness on camvid", flush=True)
        cam = cam_suite(DATA / "camvid", specs, backbone=bb, size=SIZES["camvid"], out=args.out,
                        max_train=args.camvid_train, max_eval=args.camvid_eval,
                        progress=args.progress, log=print)
        seconds["cam"] = time.perf_counter() - t
    total = time.perf_counter() - t0

    notes = sorted({n for res in [*results.values(), cam] if res for n in res["notes"]})
    if args.merge and (args.out / "eval_table.json").is_file():
        earlier = json.loads((args.out / "eval_table.json").read_text())
        for k, v in earlier["results"].items():
            if k not in results:
                results[k] = {**v, "notes": []}
                notes.append(f"{k}: kept from the earlier run in {args.out / 'eval_table.json'} "
                             f"(weight decay {v['meta']['weight decay']:g}, "
                             f"{v['meta']['seconds'] / 60:.1f} min)")
        results = {k: results[k] for k in SIZES if k in results}
    setup = "; ".join(f"{k}: {v['meta']['train images']} train / {v['meta']['eval images']} eval "
                      f"images at {v['meta']['size (H, W)'][0]}x{v['meta']['size (H, W)'][1]}"
                      for k, v in results.items())
    decays = " / ".join(f"{k} {v['meta']['weight decay']:g}" + (
        " (cross-validated on train sequences, bilinear features)"
        if CV_META in v["meta"] else "")
        for k, v in results.items())
    md = [f"# upfeat evaluation: {args.backbone}, linear probes", "",
          combined_table(results), "",
          f"{setup}; 1500 px per train image, seed 0, {args.max_iter} L-BFGS iterations, weight "
          f"decay {decays}; rows: "
          f"{', '.join(specs)}; torch threads: {torch.get_num_threads()}; total "
          f"{total / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f} min' for k, v in seconds.items())}). "
          f"Row times exclude the shared backbone pass.", *(f"- {n}" for n in notes)]
    if cam:
        md += ["", "CAM faithfulness (CamVid val): A.D. ↓ / A.I. ↑: " + ", ".join(
            f"`{r['label']}` {r['metrics']['avg_drop']:.2f} / {r['metrics']['avg_increase']:.2f}"
            for r in cam["rows"])]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_table.md").write_text("\n".join(md) + "\n")
    (args.out / "eval_table.json").write_text(json.dumps(json_safe(
        {"results": {k: {"rows": v["rows"], "meta": v["meta"]} for k, v in results.items()},
         "cam": cam.get("rows"), "specs": specs, "seconds": seconds, "total_seconds": total,
         "notes": notes}), indent=2, default=str) + "\n")
    print("\n".join(md))
    print(f"wrote {args.out / 'eval_table.md'} and eval_*.{{md,json,png}} in {args.out}")
    for failure in sanity(results):
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if sanity(results) else 0


if __name__ == "__main__":
    sys.exit(main())
