"""A/B of a default training run: this checkout against another source tree, alternating.

Each round runs ``upfeat train --steps N`` (default settings: vits14_focus, jbu_stack, batch 2,
4 views, 224 px, seed 0) on CamVid train images with the other tree's package, then with this
one (``PYTHONPATH`` picks the tree; same Python, same torch). Per run: median seconds per step
over steps 6..N (the first steps build the C++ extension and warm the caches) and the loss every
10 steps, which shows whether the loss curve is the same (same seed, same data order).

    git worktree add /tmp/old <commit>    # e.g. the state before issue 16
    python benchmarks/bench_train_step.py --other /tmp/old --rounds 2

Writes benchmarks/results/train_step.md (``--out``). Say what else ran (the load averages are recorded).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "camvid" / "train" / "images"


def run(tree: Path, steps: int, out: Path) -> dict:
    tree = tree.resolve()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # cwd outside both trees: `python -m` puts the cwd first on sys.path, before PYTHONPATH
    where = subprocess.run([sys.executable, "-c", "import upfeat; print(upfeat.__file__)"],
                           env=env, cwd=out.parent, check=True, capture_output=True, text=True)
    if not Path(where.stdout.strip()).is_relative_to(tree):
        raise SystemExit(f"{tree}: imported upfeat from {where.stdout.strip()} instead")
    load0 = os.getloadavg()[0]
    subprocess.run([sys.executable, "-m", "upfeat", "train", "--data", str(DATA), "--steps",
                    str(steps), "--out", str(out), "--no-progress"], env=env, check=True,
                   capture_output=True, cwd=out.parent)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    secs = [float(r["sec_per_step"]) for r in rows][5:]
    losses = [round(float(r["loss"]), 2) for r in rows if int(r["step"]) % 10 == 0]
    return {"s_per_step": statistics.median(secs), "losses": losses,
            "load": (load0, os.getloadavg()[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", type=Path, required=True, help="source tree of the other version")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_step.md")
    args = ap.parse_args()
    res = {"other": [], "this": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, tree in (("other", args.other), ("this", ROOT)):
                out = run(tree, args.steps, Path(tmp) / f"{name}{r}")
                res[name].append(out)
                print(f"round {r} {name}: {out['s_per_step']:.3f} s/step, loss every 10 steps "
                      f"{out['losses']}, load {out['load'][0]:.1f} -> {out['load'][1]:.1f}",
                      flush=True)
    lines = ["# Default training step: this checkout vs another (same seed, same data)", "",
             f"`python benchmarks/bench_train_step.py --other {args.other} --steps {args.steps} "
             f"--rounds {args.rounds}`; median s/step over steps 6-{args.steps}.", "",
             "| round | other s/step | this s/step | speed-up | other loss @10,20,.. | this loss @10,20,.. | load (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for r, (o, t) in enumerate(zip(res["other"], res["this"])):
        lines.append(f"| {r} | {o['s_per_step']:.3f} | {t['s_per_step']:.3f} | "
                     f"{o['s_per_step'] / t['s_per_step']:.2f}x | {o['losses']} | {t['losses']} | "
                     f"{o['load'][0]:.1f}-{t['load'][1]:.1f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
