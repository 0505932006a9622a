"""Implicit upsampler: the ``fast`` schedule against the authors' (``reference``) on CamVid val.

    python benchmarks/bench_implicit.py --estimate   # time one image per schedule, predict the run
    python benchmarks/bench_implicit.py              # fit (cached), probe, write results
    # the run in docs/results.md: fits on both cores first, then the table
    python benchmarks/bench_implicit.py --ablation --fit-shard 0/2 &
    python benchmarks/bench_implicit.py --ablation --fit-shard 1/2; wait
    python benchmarks/bench_implicit.py --ablation

Data: ``--images`` (N, default 8) evenly spaced CamVid val images, resized to ``--height`` (112)
pixels high and the multiple of 14 closest to the aspect ratio in width (112 x 154, 8 x 11 tokens
of ``vits14_focus``). The reference schedule costs ~13 min per image at this size on one shared
core (5 of them for its 3000 backbone views), so it runs on the first ``--ref-images`` (R,
default 4) of the N images only; every other row covers all N, and every comparison with the
reference is made on those R images (paired). Fits are cached (``--cache``, one safetensors per
image and schedule, with the wall time measured when it was fitted), so the run can be split.
Writes ``implicit.json``, ``implicit.md`` and ``implicit.png`` (two val images, every row's
features in PCA colours; it shows CamVid images, CC BY-NC, so git ignores it; the docs' figure
is ``benchmarks/fig_implicit.py``'s).

Rows: ``bilinear``; ``jbu`` (``upfeat.load("vits14_focus_jbu")``, skipped with the reason when it
cannot be loaded); ``implicit fast`` (on the JBU's output, its default base); ``implicit
reference``; with ``--ablation``, ``implicit fast, no base`` and ``implicit fast, bilinear base``
(probes A and B only). Time per image = wall time of ``fit_implicit`` (backbone views + base +
optimisation) with one thread (``OMP_NUM_THREADS=1``) on a 2-core machine shared with other jobs,
so absolute times are inflated; both schedules ran under the same conditions.

Three probe protocols (mIoU over the pooled confusion matrix; 11 classes, void ignored):

- **C, own probe on the train split** (the evaluation issue's protocol, :mod:`upfeat.eval.probe`:
  1500 random pixels per image, standardised, full-batch L-BFGS): per row, a probe trained on
  that row's features of ``--own-train-images`` (T, default 16) CamVid train images (an implicit
  fit for each of them: fits are cached), tested on the N val images. The reference schedule is
  left out (T more reference fits).
- **A, transfer**: the evaluation issue's probe (:mod:`upfeat.eval.probe`: 1500 random pixels per
  image, standardised, full-batch L-BFGS, 300 iterations) trained on *bilinear* features of
  ``--train-images`` (K, default 100) CamVid train images, then applied to every row's features
  of the val images. Fitting an implicit field per train image is out of reach on a CPU, and one
  probe for all rows asks whether a row is a drop-in replacement for the backbone's features.
  It favours rows that stay close to the bilinear features the probe was trained on.
- **B, own features**: per row, a probe trained on that row's own features of the evaluated val
  images, on the pixels of the "white" 16 x 16 squares of a checkerboard (up to 4000 per image),
  tested on the "black" squares. Closer to the paper (a probe per method), but images are shared
  between train and test pixels.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

import upfeat
from upfeat.checkpoint import CheckpointError
from upfeat.eval.datasets import PixelDataset, Sample, auto_size, camvid, subset
from upfeat.eval.metrics import SegMeter
from upfeat.eval.probe import ProbeConfig, fit_probe, sample_pixels
from upfeat import upsamplers
from upfeat.upsamplers.implicit import ImplicitFeatures, Schedule, fit_implicit, get_schedule

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "camvid"
CACHE = Path(os.environ.get("UPFEAT_CACHE", Path.home() / ".cache" / "upfeat")) / "bench_implicit"
BLOCK, OWN_PIXELS = 16, 4000


def fit_cached(sample: Sample, backbone, schedule: str | Schedule, cache: Path,
               tag: str | None = None) -> ImplicitFeatures:
    """The image's fitted field, from ``cache`` if fitted with the same schedule and seed 0
    (``tag``, default the schedule's name, names the cache file)."""
    H, W = sample.image.shape[-2:]
    schedule = get_schedule(schedule)
    path = cache / f"{tag or schedule.name}_{H}x{W}_{sample.name}_seed0.safetensors"
    want = schedule.to_dict()
    if path.is_file():
        field = ImplicitFeatures.load(path)
        if compatible(field.meta.get("schedule", {}), want) and field.meta.get("seed") == 0:
            field.meta["cached"] = True
            return field
    field = fit_implicit(sample.image, backbone, schedule=schedule, seed=0, progress=True)
    field.meta["bench"] = {"loadavg_1min": os.getloadavg()[0], "threads": torch.get_num_threads()}
    field.save(path)
    return field


def compatible(cached: dict, want: dict) -> bool:
    """Cached schedule == ``want``, counting fields added since it was written at their default."""
    defaults = {f.name: f.default for f in dataclasses.fields(Schedule)
                if f.default is not dataclasses.MISSING}
    return {**defaults, **cached} == want


def probe_own_train(feats: Callable[[Sample], torch.Tensor], train_set: PixelDataset,
                    train: list[Sample], val_feats: list[torch.Tensor], val: list[Sample],
                    ncls: int, void: int) -> dict:
    """Probe C: trained on this row's features of the train images (``train_set``, loaded as
    ``train``), tested on the val images."""
    queue = iter(train)

    def by_image(image: torch.Tensor) -> torch.Tensor:
        s = next(queue)  # sample_pixels visits the train images in order
        assert torch.equal(image[0], s.image), "train images out of order"
        return feats(s)

    x, y = sample_pixels(by_image, train_set, ProbeConfig())
    probe, _ = fit_probe(x, y, ProbeConfig(), ncls)
    return probe_transfer(probe, val_feats, val, ncls, void)


def checkerboard(h: int, w: int) -> torch.Tensor:
    """``(H, W)`` bool, True on the "white" ``BLOCK``-pixel squares (probe B's train pixels)."""
    yy, xx = torch.meshgrid(torch.arange(h) // BLOCK, torch.arange(w) // BLOCK, indexing="ij")
    return (yy + xx) % 2 == 0


def probe_transfer(probe, feats: list[torch.Tensor], samples: list[Sample], ncls: int,
                   void: int) -> dict:
    """Probe A: the bilinear-trained probe on these features, every valid pixel."""
    meter = SegMeter(ncls, void)
    for f, s in zip(feats, samples):
        meter.update(probe.predict(f)[0], s.target)
    return meter.compute()


def probe_own(feats: list[torch.Tensor], samples: list[Sample], ncls: int, void: int) -> dict:
    """Probe B: train on checkerboard-white pixels of these images, test on the black ones."""
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for f, s in zip(feats, samples):
        train = (checkerboard(*s.target.shape) & (s.target != void)).flatten().nonzero()[:, 0]
        train = train[torch.randperm(train.numel(), generator=g)[:OWN_PIXELS]]
        xs.append(f[0].flatten(1)[:, train].T)
        ys.append(s.target.flatten()[train])
    probe, _ = fit_probe(torch.cat(xs), torch.cat(ys), ProbeConfig(), ncls)
    meter = SegMeter(ncls, void)
    for f, s in zip(feats, samples):
        meter.update(probe.predict(f)[0], s.target.masked_fill(checkerboard(*s.target.shape), void))
    return meter.compute()


def reference_cost(img: torch.Tensor, backbone) -> dict:
    """Wall and CPU seconds of one reference fit, extrapolated from 100 views and 60 steps."""
    ref = get_schedule("reference")
    short = ref.replace(pool=100, steps=60)
    fit = fit_implicit(img, backbone, schedule=short, progress=False).meta["fit"]
    return {key: fit[key]["views"] * ref.pool / short.pool
            + fit[key]["steps"] * ref.steps / short.steps for key in ("seconds", "cpu_seconds")}


def estimate(samples: list[Sample], backbone, n_ref: int) -> None:
    """Time the fast schedule on one image and a short reference run; print the prediction."""
    fast = fit_implicit(samples[0].image, backbone, progress=False).meta["fit"]["seconds"]["total"]
    ref = reference_cost(samples[0].image, backbone)["seconds"]
    total = fast * len(samples) + ref * n_ref + 300  # + ~5 min of probes
    print(f"fast {fast:.0f} s/image, reference ~{ref:.0f} s/image (extrapolated); "
          f"{len(samples)} fast + {n_ref} reference fits + probes: ~{total / 60:.0f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--ref-images", type=int, default=4)
    ap.add_argument("--height", type=int, default=112)
    ap.add_argument("--train-images", type=int, default=100, help="probe A's train images")
    ap.add_argument("--own-train-images", type=int, default=16, help="probe C's train images")
    ap.add_argument("--fit-shard", metavar="I/S", help="only fit (into the cache) every S-th "
                    "fast-schedule fit from the I-th (val and probe-C train images, and the "
                    "--ablation rows), then stop: run S of these at once to use S cores")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--estimate", action="store_true", help="only time one image per schedule")
    ap.add_argument("--ablation", action="store_true", help="add rows: the fast schedule without "
                    "its base and on a bilinear base (probes A and B)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = upfeat.backbones.create("vits14_focus").eval()
    size = auto_size(camvid(DATA, "val"), bb.stride, args.height)
    val = subset(camvid(DATA, "val", size), args.images)
    samples = [val[i] for i in range(len(val))]
    n_ref = min(args.ref_images, len(samples))
    own_train_set = subset(camvid(DATA, "train", size), args.own_train_images)
    own_train = [own_train_set[i] for i in range(len(own_train_set))]
    if args.estimate:
        return estimate(samples, bb, n_ref)
    if args.fit_shard:
        try:
            i, n = map(int, args.fit_shard.split("/"))
        except ValueError:
            i, n = -1, 0
        if not 0 <= i < n:
            ap.error(f"--fit-shard must be I/S with 0 <= I < S, e.g. 0/2, got {args.fit_shard!r}")
        jobs = [(s, "fast", None) for s in samples + own_train]
        if args.ablation:
            jobs += [(s, get_schedule("fast").replace(**changes), tag)
                     for tag, changes in ABLATION.values() for s in samples]
        for s, sched, tag in jobs[i::n]:
            fit_cached(s, bb, sched, args.cache, tag)
        return None
    t_start = time.perf_counter()
    rows, notes, row_fn = features(samples, bb, n_ref, args.cache, args.ablation)
    ref_cost = reference_cost(samples[0].image, bb)
    ncls, void = val.num_classes, val.ignore_index
    train = subset(camvid(DATA, "train", size), args.train_images)
    bil = upsamplers.create("bilinear", dim=bb.dim, stride=bb.stride)
    with torch.no_grad():
        x, y = sample_pixels(lambda im: bil(bb(im), im), train, ProbeConfig(), progress=True)
    probe, _ = fit_probe(x, y, ProbeConfig(), ncls)
    del x, y
    results = []
    for name, r in rows.items():
        n = len(r["feats"])
        subsets = {"N": (r["feats"], samples[:n])} if n == len(samples) else {}
        if n_ref:
            subsets["R"] = (r["feats"][:n_ref], samples[:n_ref])
        res = {"row": name, "images": n, "seconds_per_image": r.get("seconds"),
               "cpu_seconds_per_image": r.get("cpu_mean")}
        if name in row_fn:
            res["C_N"] = probe_own_train(row_fn[name], own_train_set, own_train, r["feats"],
                                         samples, ncls, void)
        for key, (fs, ss) in subsets.items():
            res[f"A_{key}"] = probe_transfer(probe, fs, ss, ncls, void)
            res[f"B_{key}"] = probe_own(fs, ss, ncls, void)
        results.append(res)
        print(name, {k: round(v["miou"] * 100, 2) for k, v in res.items()
                     if k[:2] in ("A_", "B_", "C_")}, flush=True)
    write(args, size, samples, n_ref, rows, results, notes, ref_cost,
          time.perf_counter() - t_start, bb)


# --ablation rows: the fast schedule without its base, and on a bilinear base (cache tag, changes)
ABLATION = {"implicit fast, no base": ("fast-nobase", {"base": "none"}),
            "implicit fast, bilinear base": ("fast-bilinear", {"base": "bilinear"})}


def features(samples: list[Sample], bb, n_ref: int, cache: Path,
             ablation: bool = False) -> tuple[dict, list[str], dict]:
    """Per row: full-resolution features ``(1, C, H, W)`` of its images and seconds per image;
    notes; and per row with a probe C, a function ``Sample -> (1, C, H, W)`` features."""
    notes: list[str] = []
    bil = upsamplers.create("bilinear", dim=bb.dim, stride=bb.stride)
    rows: dict = {"bilinear": {"feats": []}}
    try:
        jbu = upfeat.load("vits14_focus_jbu").upsampler
        rows["jbu"] = {"feats": []}
    except (CheckpointError, OSError) as e:
        jbu = None
        notes.append(f"jbu row skipped: {' '.join(str(e).split())}")
    fits = {"implicit fast": ("fast", get_schedule("fast"))}
    if n_ref:
        fits["implicit reference"] = ("reference", get_schedule("reference"))
    if ablation:
        fits.update({row: (tag, get_schedule("fast").replace(**changes))
                     for row, (tag, changes) in ABLATION.items()})
    rows.update({row: {"feats": [], "times": [], "cpu": []} for row in fits})
    for i, s in enumerate(samples):
        img = s.image[None]
        with torch.no_grad():
            lr = bb(img)
            rows["bilinear"]["feats"].append(bil(lr, img))
            if jbu is not None:
                rows["jbu"]["feats"].append(jbu(lr, img))
        for row, (tag, sched) in fits.items():
            if row == "implicit reference" and i >= n_ref:
                continue
            field = fit_cached(s, bb, sched, cache, tag)
            r = rows[row]
            r["feats"].append(field.query())
            r["times"].append(field.meta["fit"]["seconds"]["total"])
            r["cpu"].append(field.meta["fit"].get("cpu_seconds", {}).get("total"))
            cached = " (cached)" if field.meta.get("cached") else ""
            r["cached"] = r.get("cached", 0) + bool(cached)
            print(f"{s.name} {row}: {r['times'][-1]:.1f} s{cached}", flush=True)
    for key in fits:
        if rows[key].get("cached"):
            notes.append(f"{key}: {rows[key]['cached']} of {len(rows[key]['times'])} fits read "
                         f"from the cache, with the times measured when they were fitted "
                         f"(possibly under another load)")
        t, c = rows[key]["times"], rows[key]["cpu"]
        rows[key]["seconds"] = sum(t) / len(t)
        rows[key]["cpu_mean"] = None if None in c else sum(c) / len(c)

    @torch.no_grad()
    def guided(up, s: Sample) -> torch.Tensor:
        return up(bb(s.image[None]), s.image[None])

    row_fn = {"bilinear": lambda s: guided(bil, s),
              "implicit fast": lambda s: fit_cached(s, bb, "fast", cache).query()}
    if jbu is not None:
        row_fn["jbu"] = lambda s: guided(jbu, s)
    return rows, notes, row_fn


def write(args, size, samples, n_ref, rows, results, notes, ref_cost, seconds, bb) -> None:
    """``implicit.json``, ``implicit.md`` and the side-by-side figure ``implicit.png``."""
    from upfeat.viz import pca_panels, save_grid

    mean = lambda v: sum(v) / len(v)  # noqa: E731
    fast, ref = rows["implicit fast"], rows.get("implicit reference")
    speed = mean(ref["times"]) / mean(fast["times"][:n_ref]) if ref else None
    fast_cpu = mean(fast["cpu"]) if None not in fast["cpu"] else float("nan")
    speed_cpu = ref_cost["cpu_seconds"] / fast_cpu
    out = {"size": list(size), "images": [s.name for s in samples], "ref_images": n_ref,
           "train_images": args.train_images, "threads": torch.get_num_threads(),
           "speedup_wall": speed, "speedup_cpu": speed_cpu,
           "reference_extrapolated": ref_cost,
           "per_image_seconds": {"fast": fast["times"], "reference": ref and ref["times"]},
           "per_image_cpu_seconds": {"fast": fast["cpu"], "reference": ref and ref["cpu"]},
           "schedules": {k: get_schedule(k).to_dict() for k in ("fast", "reference")},
           "rows": results, "notes": notes, "run_seconds": seconds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "implicit.json").write_text(json.dumps(out, indent=2) + "\n")
    pct = lambda r, k: f"{r[k]['miou'] * 100:.2f}" if k in r else "–"  # noqa: E731
    cols = ["C_N", "A_N", "A_R", "B_N", "B_R"] if n_ref else ["C_N", "A_N", "B_N"]
    ref_text = (f"reference on the first R = {n_ref}" if n_ref else
                "no reference fits (--ref-images 0)")
    lines = [f"CamVid val, {size[0]}x{size[1]}, vits14_focus; N = {len(samples)} images, "
             f"{ref_text}; 1 thread on a shared 2-core CPU.", "",
             "| row | images | s / image | " + " | ".join(
                 f"mIoU {c[0]} ({c[2]})" for c in cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for r in results:
        t = r["seconds_per_image"]
        lines.append(f"| {r['row']} | {r['images']} | {'–' if t is None else f'{t:.1f}'} | "
                     + " | ".join(pct(r, c) for c in cols) + " |")
    wall = (f"Wall time, reference / fast on the same {n_ref} images: {speed:.1f}x. "
            if speed else "")
    lines += ["", f"{wall}CPU time (less sensitive to the other jobs): fast {fast_cpu:.1f} s per "
              f"image (measured), reference {ref_cost['cpu_seconds']:.0f} s (extrapolated from 100 views and 60 "
              f"steps of it in this run): {speed_cpu:.1f}x.", *notes]
    (args.out / "implicit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    grid, shown = [], [k for k in rows if k not in ABLATION]
    for i in range(min(2, len(samples))):
        img = samples[i].image
        with torch.no_grad():
            low = bb(img[None])[0]
        ups = [rows[k]["feats"][i][0] for k in shown]
        grid.append(pca_panels(img, low, ups, bb.stride))
    save_grid(grid, args.out / "implicit.png", titles=["image", "low-res", *shown])


if __name__ == "__main__":
    main()
