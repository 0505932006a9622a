"""A/B of upfeat's C++ kernels against another build of them, alternating in one process.

The machine is shared, so two runs minutes apart are not comparable; here every round times the
other build and this one back to back (order flipped each round) and the ratios are what to quote.

    # the other build, e.g. main's: its path is printed by
    PYTHONPATH=/path/to/main python -c "from upfeat.ops.adaptive_conv import cpu; print(cpu.load_extension().__file__)"
    python benchmarks/ab_kernels.py --other /path/to/upfeat_adaptive_conv_XXXX.so

Rows: ``band_matmul`` (384 ch, 256² -> 448² + 2·3 padding, forward and adjoint), the three
adaptive-conv kernels at 224² (384 ch, k=7), the shipped JBU stack at 448² (inference, with the
backbone's time in the same rounds) and one default training step at 224² (same seed for both,
the losses are printed). Medians of ``--rounds`` rounds after one warm-up; wall and process CPU
time (CPU time is less sensitive to other processes).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

import upfeat
from upfeat.ops.adaptive_conv import cpu


def load_other(path: Path):
    name = path.stem.split(".")[0]  # the module name the .so was built under
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def alternate(fns: dict[str, callable], rounds: int) -> dict[str, tuple[float, float]]:
    """{name: (median wall s, median CPU s)}, the callables run back to back every round."""
    names = list(fns)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu_t: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        for n in names if r % 2 == 0 else names[::-1]:
            c, t = time.process_time(), time.perf_counter()
            fns[n]()
            if r:  # round 0 is the warm-up
                wall[n].append(time.perf_counter() - t)
                cpu_t[n].append(time.process_time() - c)
    return {n: (statistics.median(wall[n]), statistics.median(cpu_t[n])) for n in names}


def show(title: str, res: dict[str, tuple[float, float]], base: str | None = None) -> None:
    cells = [f"{n} {w * 1e3:.0f} ms (CPU {c * 1e3:.0f})" for n, (w, c) in res.items()]
    ratio = res["other"][0] / res["this"][0], res["other"][1] / res["this"][1]
    extra = ""
    if base:
        extra = "; /" + base + ": " + ", ".join(
            f"{n} {res[n][0] / res[base][0]:.2f}x" for n in ("other", "this"))
    print(f"{title}: {', '.join(cells)}; other/this wall {ratio[0]:.2f}x CPU {ratio[1]:.2f}x{extra}",
          flush=True)


def kernels(exts: dict, rounds: int) -> None:
    from upfeat.upsamplers.jbu import _bicubic_matrix
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 384, 256, 256, generator=g)
    a = _bicubic_matrix(256, 448, 3, x)
    at = a.t().contiguous()
    go = torch.randn(1, 384, a.shape[0], a.shape[0], generator=g)
    k, S = 7, 224
    feat = torch.randn(1, 384, S + k - 1, S + k - 1, generator=g)
    w = torch.softmax(torch.randn(1, k * k, S, S, generator=g), 1).contiguous()
    gs = torch.randn(1, 384, S, S, generator=g)
    cases = {"band_matmul 256²->454² fwd": ("band_matmul", (x, a, a)),
             "band_matmul adjoint": ("band_matmul", (go, at, at)),
             "adaptive_conv fwd 224²": ("fwd", (feat, w, k, True)),
             "adaptive_conv tr 224²": ("tr", (gs, w, k, True)),
             "adaptive_conv corr 224²": ("corr", (gs, feat, k, True))}
    for title, (op, args) in cases.items():
        outs = {n: getattr(e, op)(*args) for n, e in exts.items()}
        diff = (outs["other"] - outs["this"]).abs().max().item()
        del outs
        show(f"{title} [max|diff| {diff:.1e}]",
             alternate({n: (lambda e=e: getattr(e, op)(*args)) for n, e in exts.items()}, rounds))


def stack(exts: dict, rounds: int, size: int) -> None:
    model = upfeat.create_model("vits14_focus", "jbu").eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        low = model.lowres(x)

        def run(n):
            cpu.load_extension = lambda: exts[n]
            return model.upsampler(low, x)

        diff = (run("other") - run("this")).abs().max().item()
        fns = {"backbone": lambda: model.lowres(x), "other": lambda: run("other"),
               "this": lambda: run("this")}
        show(f"JBU stack {size}² inference [max|diff| {diff:.1e}]", alternate(fns, rounds), "backbone")


def train(exts: dict, rounds: int, size: int) -> None:
    from upfeat.jitter import apply_view, sample_views
    from upfeat.train.config import TrainConfig
    from upfeat.train.objective import MultiViewObjective
    cfg = TrainConfig(image_size=size)
    net = upfeat.backbones.create(cfg.backbone).requires_grad_(False).eval()
    image = torch.rand(cfg.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    views = sample_views(cfg.views, torch.Generator().manual_seed(0), (size, size),
                         max_zoom=cfg.max_zoom, max_pad=cfg.max_pad)
    with torch.no_grad():
        lr_feats = net(image)
        view_images = [apply_view(image, v) for v in views]
        view_feats = [net(v) for v in view_images]
    state, losses = {}, {n: [] for n in exts}
    for n in exts:
        torch.manual_seed(cfg.seed)
        obj = MultiViewObjective.from_config(cfg, [net.dim], [net.stride]).train()
        params = list(obj.parameters())
        opt = torch.optim.NAdam([{"params": [p for p in params if p.ndim > 0]},
                                 {"params": [p for p in params if p.ndim == 0]}], lr=cfg.lr)
        state[n] = obj, opt

    def step(n):
        cpu.load_extension = lambda: exts[n]
        torch.manual_seed(len(losses[n]))  # same dropout masks for both builds
        obj, opt = state[n]
        loss = obj(image, lr_feats, views, view_images, view_feats,
                   torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[n].append(loss.item())

    show(f"training step {size}² (backbone excluded)",
         alternate({n: (lambda n=n: step(n)) for n in exts}, rounds))
    for n, v in losses.items():
        print(f"  losses {n}: {' '.join(f'{x:.5f}' for x in v)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", type=Path, required=True, help="the other build's .so")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["kernels", "stack", "train"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    exts = {"other": load_other(args.other), "this": cpu.load_extension()}
    print(f"threads {args.threads}, load average {os.getloadavg()}")
    if "kernels" not in args.skip:
        kernels(exts, args.rounds)
    if "stack" not in args.skip:
        stack(exts, args.rounds, 448)
    if "train" not in args.skip:
        train(exts, args.rounds, 224)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
