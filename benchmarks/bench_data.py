"""The training data path at scale: throughput, data wait, start-up and peak memory.

Generates folders of small JPEGs (320x240 crops of the DAVIS frames in ../shared, written round
robin into sub-folders of 1000, as datasets are laid out) in a temporary folder, deleted after.

1. ``throughput``: images/s of the streamed path (:class:`upfeat.train.data.TrainBatches` through
   the DataLoader, batch 2, 224-px crops) with 0, 1 and 2 workers, against the in-memory path of
   upfeat <= 0.x (every image decoded and resized into RAM at start, then cropped): its start-up
   and its RAM per image, measured on the smallest folder.
2. ``train``: ``upfeat train --steps 20`` with the test suite's tiny model (56-px crops, 2 views,
   ``range_dim`` 8; vits14_focus, batch 2 as by default; ``--train-args`` to change) on each folder
   in a fresh process. The small model makes the data path a larger share of the memory and of
   the step time than the defaults would (a stricter test of both): peak memory of the process tree (sum of PSS,
   sampled every 0.2 s, so forked workers' shared pages count once) and of the main process
   (VmHWM), time from launch to the start of step 1, and the data wait per step (time the loop
   waited for its batch, ``data_wait_s`` in metrics.csv) with 0 and 2 workers.

    nice -n 10 python benchmarks/bench_data.py                    # 2k, 20k, 100k: 22 min here
    python benchmarks/bench_data.py --sizes 2000 20000 --steps 10  # quicker

Writes benchmarks/results/data.json and data.md. The machine is shared: the load average at the
start and end of the run is recorded with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
DAVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis" / "images"


def make_folder(root: Path, n: int, blobs: list[bytes]) -> float:
    """``n`` JPEGs under ``root`` (sub-folders of 1000); returns seconds taken."""
    t = time.perf_counter()
    for i in range(n):
        d = root / f"{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])
    return time.perf_counter() - t


def jpeg_blobs(k: int = 200) -> list[bytes]:
    """``k`` distinct 320x240 JPEGs (quality 90) cut from the DAVIS frames."""
    import io

    import numpy as np
    from PIL import Image

    frames = sorted(DAVIS.glob("*/*.jpg"))
    rng = np.random.default_rng(0)
    out = []
    for i in range(k):
        im = Image.open(frames[int(rng.integers(len(frames)))]).convert("RGB")
        x, y = int(rng.integers(im.width - 639)), int(rng.integers(im.height - 479))
        buf = io.BytesIO()
        im.crop((x, y, x + 640, y + 480)).resize((320, 240), Image.BICUBIC).save(buf, "JPEG",
                                                                               quality=90)
        out.append(buf.getvalue())
    return out


def throughput(folder: Path, steps: int) -> dict:
    import numpy as np
    import torch

    from upfeat.train.data import TrainBatches, batch_loader, list_files, load_resized

    res: dict = {}
    t = time.perf_counter()
    files = list_files([folder])
    res["list_s"] = time.perf_counter() - t
    data = TrainBatches(files, 224, batch_size=2, seed=0, crops=224)
    for workers in (0, 1, 2):
        loader = iter(batch_loader(data, range(steps + 2), workers))
        next(loader), next(loader)  # workers started and warm
        t = time.perf_counter()
        for _ in range(steps):
            next(loader)
        res[f"stream_{workers}w_img_s"] = 2 * steps / (time.perf_counter() - t)
        del loader
    # upfeat <= 0.x: decode and resize every image first, then crop from RAM
    n = min(len(files), 2000)
    t = time.perf_counter()
    images = [load_resized(f, 224) for f in files[:n]]
    decode_s = time.perf_counter() - t
    res["inmemory_startup_s_per_1000"] = 1000 * decode_s / n
    res["inmemory_bytes_per_image"] = sum(x.nbytes for x in images) / n
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for s in range(steps):
        batch = []
        for i in torch.randint(n, (2,), generator=gen).tolist():
            h, w = images[i].shape[:2]
            top = int(torch.randint(h - 223, (1,), generator=gen))
            left = int(torch.randint(w - 223, (1,), generator=gen))
            batch.append(images[i][top:top + 224, left:left + 224])
        torch.from_numpy(np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2)))
    res["inmemory_img_s"] = 2 * steps / (time.perf_counter() - t)
    return res


def _pss_tree(pid: int) -> int:
    """Sum of PSS (bytes) of ``pid`` and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return total


def train_run(folder: Path, run: Path, steps: int, workers: int, extra: list[str]) -> dict:
    """One ``upfeat train`` process: peak PSS of the tree, VmHWM of the main process, start-up."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "upfeat", "train", "--data", str(folder), "--out", str(run),
           "--steps", str(steps), "--workers", str(workers), "--no-progress",
           "--ckpt-every", str(steps), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peak, hwm, first_row = 0, 0, None
    metrics = run / "metrics.csv"
    while proc.poll() is None:
        peak = max(peak, _pss_tree(proc.pid))
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]) * 1024)
        except OSError:
            pass
        if first_row is None and metrics.is_file() and len(metrics.read_text().splitlines()) > 1:
            first_row = time.perf_counter() - t0
        time.sleep(0.2)
    err = proc.stderr.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
    from upfeat.train.log import CsvLog
    rows = CsvLog.read(metrics)
    waits = [r["data_wait_s"] for r in rows[1:]]  # step 1 waits for the workers to start
    return {"peak_pss_mb": peak / 2**20, "main_vmhwm_mb": hwm / 2**20,
            "startup_s": first_row - rows[0]["sec_per_step"] if first_row else None,
            "sec_per_step": sorted(r["sec_per_step"] for r in rows[1:])[len(rows[1:]) // 2],
            "data_wait_first_s": rows[0]["data_wait_s"],
            "data_wait_mean_s": sum(waits) / len(waits), "data_wait_max_s": max(waits),
            "files_listed": len(json.loads((run / "files.json").read_text())["files"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    ap.add_argument("--steps", type=int, default=20, help="upfeat train --steps")
    ap.add_argument("--loader-steps", type=int, default=100, help="batches timed per worker count")
    ap.add_argument("--tmp", default=None, help="where to generate the folders")
    ap.add_argument("--train-args", default='--image-size 56 --views 2 --upsampler-args {"range_dim":8}',
                    help="extra upfeat train options")
    args = ap.parse_args()
    result = {"load_start": os.getloadavg(), "cpus": os.cpu_count(), "sizes": {},
              "train_args": args.train_args}
    blobs = jpeg_blobs()
    tmp = Path(tempfile.mkdtemp(prefix="upfeat_bench_data_", dir=args.tmp))
    try:
        for n in args.sizes:
            folder = tmp / f"imgs_{n}"
            r: dict = {"generate_s": make_folder(folder, n, blobs)}
            print(f"{n} images generated in {r['generate_s']:.0f} s", flush=True)
            if n == min(args.sizes):
                r["throughput"] = throughput(folder, args.loader_steps)
                print(json.dumps(r["throughput"]), flush=True)
            for workers in (2, 0) if n == min(args.sizes) else (2,):
                run = tmp / f"run_{n}_{workers}"
                r[f"train_{workers}w"] = train_run(folder, run, args.steps, workers,
                                                     args.train_args.split())
                print(n, workers, json.dumps(r[f"train_{workers}w"]), flush=True)
                shutil.rmtree(run)
            shutil.rmtree(folder)
            result["sizes"][n] = r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_end"] = os.getloadavg()
    OUT.mkdir(exist_ok=True)
    (OUT / "data.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "data.md").write_text(report(result, args.steps))
    print(report(result, args.steps))


def report(res: dict, steps: int) -> str:
    sizes = sorted(res["sizes"], key=int)
    small = res["sizes"][sizes[0]]
    tp = small["throughput"]
    lines = [f"# Training data path (benchmarks/bench_data.py)\n",
             f"{res['cpus']} CPUs, load average {res['load_start'][0]:.1f} at start, "
             f"{res['load_end'][0]:.1f} at end (shared machine).\n",
             f"Loader alone ({sizes[0]} images, batch 2, 224 px crops of 320x240 JPEGs):\n",
             "| path | images/s |", "|---|---|"]
    lines += [f"| streamed, {w} worker(s) | {tp[f'stream_{w}w_img_s']:.0f} |" for w in (0, 1, 2)]
    lines += [f"| in memory (after decoding all first) | {tp['inmemory_img_s']:.0f} |",
              "", f"In-memory start-up: {tp['inmemory_startup_s_per_1000']:.1f} s per 1000 "
              f"images and {tp['inmemory_bytes_per_image'] / 1e3:.0f} kB of RAM per image "
              f"(100k images: ~{tp['inmemory_startup_s_per_1000'] * 100:.0f} s and "
              f"~{tp['inmemory_bytes_per_image'] * 1e5 / 2**30:.1f} GB, by extrapolation).\n",
              f"`upfeat train --steps {steps} {res['train_args']}` (vits14_focus, batch 2):\n",
              "| images | workers | peak PSS, process tree (MB) | main VmHWM (MB) | time to step 1 (s) "
              "| s/step | data wait/step mean, max (s) |", "|---|---|---|---|---|---|---|"]
    for n in sizes:
        for key in sorted(k for k in res["sizes"][n] if k.startswith("train_")):
            t = res["sizes"][n][key]
            lines.append(f"| {int(n):,} | {key[6]} | {t['peak_pss_mb']:.0f} | "
                         f"{t['main_vmhwm_mb']:.0f} | {t['startup_s']:.1f} | "
                         f"{t['sec_per_step']:.2f} | {t['data_wait_mean_s']:.4f}, "
                         f"{t['data_wait_max_s']:.4f} |")
    a, b = res["sizes"][sizes[0]]["train_2w"], res["sizes"][sizes[-1]]["train_2w"]
    lines.append(f"\nPeak PSS {int(sizes[-1]):,} vs {int(sizes[0]):,} images (2 workers): "
                 f"{b['peak_pss_mb'] / a['peak_pss_mb']:.3f}x (acceptance: <= 1.2x); start-up "
                 f"{b['startup_s']:.1f} s (acceptance: < 60 s).\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
