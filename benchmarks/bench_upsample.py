"""Time per image: backbone, upsampler and total, per backbone, size and upsampler (inference).

    python benchmarks/bench_upsample.py                       # 4 offline backbones, 224/448/896², 1 and 2 threads
    python benchmarks/bench_upsample.py --backbones vits14_focus --sizes 448 --threads 2

Inference mode, batch 1, a random image (the time does not depend on the content), median of
``--repeat`` runs after one warm-up. ``jbu`` is the shipped backbone-agnostic JBU. Peak memory:
resident memory above the level before the call (Linux VmHWM, reset through
/proc/self/clear_refs; the C++ kernels' output pool is emptied first so recycled buffers count).
The implicit upsampler is not a row: it fits per image for minutes (benchmarks/bench_implicit.py).
Writes ``benchmarks/results/bench_upsample.{md,json}``. Say what else ran on the machine
(``uptime``, printed with every row) when quoting it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch

import upfeat
from _timing import median_time

OUT = Path(__file__).resolve().parent / "results"


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_mb(fn) -> float:
    """Peak resident MB above the current level while ``fn()`` runs (Linux)."""
    gc.collect()
    upfeat.ops.empty_cache()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    fn()
    return (_status("VmHWM") - base) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="vits14_focus,mobilenetv2,efficientnet_lite0,vgg16_hed")
    p.add_argument("--rows", default="nearest,bilinear,jbu")
    p.add_argument("--sizes", default="224,448,896", help="square image sides, comma-separated")
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()

    results = []
    for name in args.backbones.split(","):
        models = {row: upfeat.create_model(name, row) for row in args.rows.split(",")}
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for side in map(int, args.sizes.split(",")):
                x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
                with torch.inference_mode():
                    first = next(iter(models.values()))
                    t_bb = median_time(lambda: first.lowres(x), args.repeat)
                    m_bb = peak_mb(lambda: first.lowres(x))
                    low = first.lowres(x)
                    for row, model in models.items():
                        t_up = median_time(lambda: model.upsampler(low, x), args.repeat)
                        m_up = peak_mb(lambda: model.upsampler(low, x))
                        results.append({"backbone": name, "upsampler": row, "size": side,
                                        "threads": threads, "backbone_s": t_bb, "upsampler_s": t_up,
                                        "total_s": t_bb + t_up, "backbone_peak_MB": m_bb,
                                        "upsampler_peak_MB": m_up, "load": os.getloadavg()[0]})
                        print(json.dumps(results[-1]), flush=True)
    md = ["| backbone | upsampler | size | threads | backbone (s) | upsampler (s) | total (s) | "
          "peak MB (backbone / upsampler) | load |", "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| `{r['backbone']}` | `{r['upsampler']}` | {r['size']}² | {r['threads']} | "
           f"{r['backbone_s']:.3f} | {r['upsampler_s']:.3f} | {r['total_s']:.3f} | "
           f"{r['backbone_peak_MB']:.0f} / {r['upsampler_peak_MB']:.0f} | {r['load']:.1f} |"
           for r in results]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_upsample.md").write_text("\n".join(md) + "\n")
    (args.out / "bench_upsample.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
