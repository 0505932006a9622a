"""Benchmark of the adaptive convolution: reference vs torch.compile'd shift loop vs upfeat's fast path.

B=1, C=384, k=7, fp32, outputs 56², 112², 224², 448², all in one process so ratios are fair.
For each variant and size: first-call time (extension load / torch.compile), forward and
forward+backward median of ``--repeats`` runs after a warm-up, and peak extra resident memory
(Linux VmHWM, reset through /proc/self/clear_refs) over the inputs already allocated.

    python benchmarks/bench_adaptive_conv.py            # full run (~10 min, mostly the reference)
    python benchmarks/bench_adaptive_conv.py --sizes 56 112 --skip-reference   # quick look

Writes benchmarks/results/adaptive_conv.json and .md (the table in docs/results.md).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

# A fresh Inductor cache, so the compiled row's first call shows the real compile time.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="upfeat-bench-inductor-")

import torch  # noqa: E402

from upfeat.ops import adaptive_conv, adaptive_conv_reference, empty_cache  # noqa: E402
from upfeat.ops.adaptive_conv.cpu import load_extension  # noqa: E402
from upfeat.ops.adaptive_conv.shift import adaptive_conv_shift  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
# The reference materialises (B, C, k*k, H, W): 15 GB at 448² for the unfold alone, ~30 GB with
# einsum and backward, more than this 24 GB machine has.
REFERENCE_MAX = 224


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra_bytes(fn) -> int:
    """Peak resident memory above the current level while ``fn()`` runs (Linux only).

    The fast path's output pool is emptied first, so recycled buffers are counted as new memory.
    """
    gc.collect()
    empty_cache()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    fn()
    return _status("VmHWM") - base


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first-call seconds, median seconds of ``repeats`` further calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench(name: str, op, size: int, repeats: int, C: int = 384, k: int = 7) -> dict:
    torch.manual_seed(0)
    feat = torch.randn(1, C, size + k - 1, size + k - 1, requires_grad=True)
    w = torch.randn(1, size, size, k, k, requires_grad=True)
    grad = torch.randn(1, C, size, size)

    def fwd():
        with torch.no_grad():
            op(feat, w)

    def fwd_bwd():
        op(feat, w).backward(grad)
        feat.grad = w.grad = None

    first_f, t_f = timed(fwd, repeats)
    first_fb, t_fb = timed(fwd_bwd, repeats)
    row = dict(
        variant=name, size=size, C=C, k=k, repeats=repeats,
        first_fwd_s=first_f, first_fwd_bwd_s=first_fb, fwd_s=t_f, fwd_bwd_s=t_fb,
        peak_fwd_MB=peak_extra_bytes(fwd) / 1e6, peak_fwd_bwd_MB=peak_extra_bytes(fwd_bwd) / 1e6,
        output_MB=grad.numel() * 4 / 1e6,
    )
    print(
        f"{size:>4}² {name:<10} fwd {t_f * 1e3:9.1f} ms  fwd+bwd {t_fb * 1e3:9.1f} ms  "
        f"peak {row['peak_fwd_MB']:7.0f}/{row['peak_fwd_bwd_MB']:7.0f} MB  "
        f"first call {first_f:6.2f}/{first_fb:6.2f} s",
        flush=True,
    )
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| size | variant | forward | fwd+bwd | fwd+bwd vs fast | peak extra MB (fwd / fwd+bwd) | first call (fwd / fwd+bwd) |",
        "|---|---|---|---|---|---|---|",
    ]
    fast = {r["size"]: r for r in rows if r["variant"] == "fast"}
    for r in rows:
        ratio = r["fwd_bwd_s"] / fast[r["size"]]["fwd_bwd_s"] if r["size"] in fast else float("nan")
        lines.append(
            f"| {r['size']}² | {r['variant']} | {r['fwd_s'] * 1e3:.1f} ms | {r['fwd_bwd_s'] * 1e3:.1f} ms | "
            f"{ratio:.1f}× | {r['peak_fwd_MB']:.0f} / {r['peak_fwd_bwd_MB']:.0f} | "
            f"{r['first_fwd_s']:.2f} s / {r['first_fwd_bwd_s']:.2f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[56, 112, 224, 448])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT / "adaptive_conv.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_extension()  # built once per machine (~25 s), then loaded from the torch extensions cache
    ext_load_s = time.perf_counter() - t0
    print(f"C++ extension ready in {ext_load_s:.1f} s")
    # Free big blocks back to the OS at once so RSS peaks measure what each run allocates.
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MB (fixed)
    torch._dynamo.config.cache_size_limit = 64  # one static graph per size and mode
    compiled = torch.compile(adaptive_conv_shift, dynamic=False)
    variants = [("fast", lambda f, w: adaptive_conv(f, w, backend="cpp")), ("compiled", compiled)]
    if not args.skip_reference:
        variants.append(("reference", adaptive_conv_reference))
    rows = []
    for size in args.sizes:
        for name, op in variants:
            if name == "reference" and size > REFERENCE_MAX:
                print(f"{size:>4}² reference  skipped: needs > 24 GB (unfold alone is "
                      f"{384 * 49 * size * size * 4 / 1e9:.0f} GB)")
                continue
            rows.append(bench(name, op, size, args.repeats))
    meta = dict(torch=torch.__version__, machine=platform.machine(), processor=platform.processor(),
                threads=args.threads, reference_skipped_above=REFERENCE_MAX,
                extension_load_s=ext_load_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = markdown(rows)
    args.out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
