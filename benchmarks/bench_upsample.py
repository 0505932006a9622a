"""Time per image: backbone, upsampler and total, per backbone, size and upsampler (inference).

    python benchmarks/bench_upsample.py                                   # 4 offline backbones, 448²
    python benchmarks/bench_upsample.py --sizes 224,448,896 --threads 1,2 --rows nearest,bilinear,jbu

Inference mode, batch 1, a random image (the time does not depend on the content), median of
``--repeat`` runs after one warm-up. ``jbu`` is the shipped backbone-agnostic JBU. Writes
``benchmarks/results/bench_upsample.{md,json}``. Say what else ran on the machine when quoting it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import upfeat
from _timing import median_time

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="vits14_focus,mobilenetv2,efficientnet_lite0,vgg16_hed")
    p.add_argument("--rows", default="bilinear,jbu")
    p.add_argument("--sizes", default="448", help="square image sides, comma-separated")
    p.add_argument("--threads", default="2", help="torch thread counts, comma-separated")
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
                    low = first.lowres(x)
                    for row, model in models.items():
                        t_up = median_time(lambda: model.upsampler(low, x), args.repeat)
                        results.append({"backbone": name, "upsampler": row, "size": side,
                                        "threads": threads, "backbone_s": t_bb, "upsampler_s": t_up,
                                        "total_s": t_bb + t_up})
                        print(json.dumps(results[-1]), flush=True)
    md = ["| backbone | upsampler | size | threads | backbone (s) | upsampler (s) | total (s) |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| `{r['backbone']}` | `{r['upsampler']}` | {r['size']}² | {r['threads']} | "
           f"{r['backbone_s']:.3f} | {r['upsampler_s']:.3f} | {r['total_s']:.3f} |" for r in results]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_upsample.md").write_text("\n".join(md) + "\n")
    (args.out / "bench_upsample.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
