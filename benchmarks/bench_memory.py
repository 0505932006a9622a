"""Peak memory of one untiled UpFeat forward, to calibrate :mod:`upfeat.inference.memory`.

Each (part, upsampler, size) runs in a fresh process: build vits14_focus + the upsampler
(``jbu_stack`` randomly initialised, ``bilinear``), warm up on a 56x56 image, reset the Linux
peak-RSS counter (/proc/self/clear_refs), then run under ``torch.inference_mode`` and record
VmHWM - VmRSS before the call (so the result includes the output tensor but not the model or the
input). ``part`` is ``backbone`` (low-res features only), ``upsampler`` (features given),
``both``, or ``tiled`` (:func:`upfeat.inference.tiled.upsample_tiled` with 448-px upsampler tiles, backbone
in one pass, output in memory; compared with :func:`upfeat.inference.planning.plan_memory`'s estimate). Sizes
are square; the extra non-square size checks the per-pixel scaling.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py       # ~4 min on 1 core
    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --parts tiled --sizes 896

Writes benchmarks/results/memory.json and prints the fitted constants per pixel / token.

``--cli`` instead runs the whole ``upfeat upsample`` command on a real photo resized to each
size (``skate.jpg`` from ../shared/data/samples, saved as PNG), under ``/usr/bin/time -v``: peak
RSS of the process (everything: torch, model, image, tiles, the writer's band) against
``--max-memory``, wall time, the load average of this shared machine around the run, and the
bytes the run sent towards the disk over the output file's size (``/proc/self/io`` write_bytes
less cancelled_write_bytes of this process, which takes in a child's once it is reaped; pages
rewritten after writeback count again, ~1 is the goal).
Acceptance (issue 15): peak <= 1.1 x budget, and the 6000x4000 JBU run <= 10 min.

    python benchmarks/bench_memory.py --cli 1500x2000:1GB:bilinear 1500x2000:1GB:jbu \
        4000x6000:2GB:jbu

Appends to benchmarks/results/memory_cli.json and rewrites memory_cli.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
PHOTO = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "samples" / "featup" / "skate.jpg"


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _written() -> int:
    """Bytes this process and its reaped children sent towards the disk: dirtied pages less
    those dropped unwritten (FeatureWriter's truncated scratch file); 0 off Linux."""
    try:
        io = dict(ln.split(": ") for ln in Path("/proc/self/io").read_text().splitlines())
    except OSError:
        return 0
    return int(io["write_bytes"]) - int(io["cancelled_write_bytes"])


def one(part: str, upsampler: str, h: int, w: int) -> dict:
    import torch

    import upfeat
    from upfeat.inference.planning import plan_memory
    from upfeat.inference.tiled import upsample_tiled
    from upfeat.ops import empty_cache
    from upfeat import upsamplers

    bb = upfeat.backbones.create("vits14_focus")
    model = upfeat.UpFeat(bb, upsamplers.create(upsampler, dim=bb.dim, stride=bb.stride)).eval()
    img = torch.rand(1, 3, h, w)
    with torch.inference_mode():
        model(torch.rand(1, 3, 56, 56))
        feats = model.lowres(img) if part == "upsampler" else None
        mem = plan_memory(model, (h, w), 10**12, tile=448)
        gc.collect()
        empty_cache()
        Path("/proc/self/clear_refs").write_text("5")
        base = _status("VmRSS")
        if part == "backbone":
            res = model.lowres(img)
        elif part == "upsampler":
            res = model.upsampler(feats, img)
        elif part == "tiled":
            res = upsample_tiled(model, img, mem.plan)[0]
        else:
            res = model(img)
        peak = _status("VmHWM") - base
    return {"part": part, "upsampler": upsampler, "h": h, "w": w, "peak": peak,
            "estimate": mem.tiled if part == "tiled" else mem.untiled,
            "result_bytes": res.numel() * res.element_size(), "tokens": -(-h // 14) * -(-w // 14)}


def cli_row(spec: str) -> dict:
    """Run ``upfeat upsample`` for ``HxW:BUDGET:UPSAMPLER`` (float16 output) and measure it."""
    from PIL import Image

    from upfeat.inference.memory import parse_bytes
    size, budget, up = spec.split(":")
    h, w = map(int, size.split("x"))
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        src = Path(tmp) / f"photo_{h}x{w}.png"
        with Image.open(PHOTO) as im:
            im.convert("RGB").resize((w, h), Image.BICUBIC).save(src, compress_level=1)
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "upfeat", "upsample", str(src),
               "--out", str(Path(tmp) / "o"), "--upsampler", up, "--max-memory", budget,
               "--dtype", "float16", "--accelerator", "cpu"]
        load0, t0, w0 = os.getloadavg(), time.time(), _written()
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)  # failures are rows
        wall, load1, written = time.time() - t0, os.getloadavg(), _written() - w0
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)[1]) * 1024
        cpu_s = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", r.stderr)[1])
                    for k in ("User", "System"))
        out = Path(tmp) / "o" / f"{src.stem}.safetensors"
        nbytes = out.stat().st_size if out.is_file() else 0
        plan = [ln for ln in r.stdout.splitlines() if ln.startswith(str(src))]
    errors = [ln for ln in (r.stdout + r.stderr).splitlines()
              if ln.startswith(("failed:", "error:"))]
    return {"size": size, "budget": budget, "upsampler": up, "exit": r.returncode,
            "written": out.name if r.returncode == 0 else None, "peak_rss": peak,
            "peak_over_budget": round(peak / parse_bytes(budget), 3), "seconds": round(wall, 1),
            "load_before": round(load0[0], 2), "load_after_1min": round(load1[0], 2),
            "load_after_15min": round(load1[2], 2), "cpus": os.cpu_count(),
            "cpu_seconds": round(cpu_s, 1), "nice": os.nice(0), "disk_written": written,
            "written_over_file": round(written / nbytes, 2) if nbytes else None,
            "plan": plan[0] if plan else None, "errors": errors[:2],
            "date": time.strftime("%Y-%m-%d %H:%M")}


def cli_rows(specs: list[str]) -> None:
    path = OUT / "memory_cli.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    for spec in specs:
        rows.append(cli_row(spec))
        path.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(rows[-1]), flush=True)
    write_md(rows)


def write_md(rows: list[dict]) -> None:
    """Rewrite memory_cli.md from the rows of memory_cli.json."""
    lines = ["| image | budget | upsampler | exit | peak RSS | peak / budget | time | CPU-s "
             "(user + sys) | disk writes / file | load (1 min, before / after) | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['budget']} | {r['upsampler']} | {r['exit']} | "
                     f"{r['peak_rss'] / 1e9:.2f} GB | {r['peak_over_budget']:.2f} | "
                     f"{r['seconds'] / 60:.1f} min | {r.get('cpu_seconds', '')} | "
                     f"{r.get('written_over_file') or ''} | "
                     f"{r['load_before']} / {r['load_after_1min']} | {r['date']} |")
    (OUT / "memory_cli.md").write_text(
        "# `upfeat upsample` peak RSS vs --max-memory (float16 output, 2-core shared CPU)\n\n"
        + "\n".join(lines) + "\n\nMade by `python benchmarks/bench_memory.py --cli ...`; "
        "errors and the tile plan of each run are in memory_cli.json.\n"
        + "".join(f"\n- {r['size']} {r['upsampler']}: {r['note']}\n" for r in rows if r.get("note")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", nargs="+", metavar="HxW:BUDGET:UPSAMPLER")
    ap.add_argument("--one", nargs=4, metavar=("PART", "UPSAMPLER", "H", "W"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 672, 896])
    ap.add_argument("--parts", nargs="+", default=["backbone", "upsampler", "both", "tiled"])
    args = ap.parse_args()
    if args.cli:
        cli_rows(args.cli)
        return
    if args.one:
        part, up, h, w = args.one
        print(json.dumps(one(part, up, int(h), int(w))))
        return
    path = OUT / "memory.json"
    rows = [r for r in (json.loads(path.read_text()) if path.is_file() else [])
            if r["part"] not in args.parts]
    shapes = [(s, s) for s in args.sizes] + ([(336, 1008)] if len(args.sizes) > 1 else [])
    runs = [("backbone", "bilinear"), ("upsampler", "bilinear"), ("upsampler", "jbu_stack"),
            ("both", "jbu_stack"), ("tiled", "bilinear"), ("tiled", "jbu_stack")]
    for part, up in (r for r in runs if r[0] in args.parts):
        for h, w in shapes:
            if part == "tiled" and max(h, w) <= 448:
                continue
            r = subprocess.run([sys.executable, __file__, "--one", part, up, str(h), str(w)],
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            d = rows[-1]
            px = h * w
            print(f"{part:9s} {up:9s} {h}x{w}: peak {d['peak'] / 2**20:8.1f} MiB = "
                  f"{d['peak'] / px:7.1f} B/px = {d['peak'] / d['tokens'] / 384 / 4:6.2f} x "
                  f"tokens*dim*4; plan_memory estimate {d['estimate'] / 2**20:8.1f} MiB",
                  flush=True)
    OUT.mkdir(exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
