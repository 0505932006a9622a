"""Where the time goes: one JBU-stack inference forward and one training step, by section.

    python benchmarks/profile_jbu.py                       # 224² and 448², 2 threads
    python benchmarks/profile_jbu.py --sizes 224 --threads 1 --skip-train

Inference: ``create_model("vits14_focus", "jbu")`` (the shipped agnostic stack), batch 1, inference
mode. Training: one step of the default :class:`~upfeat.train.TrainConfig` (vits14_focus,
``jbu_stack``, attention downsampler, batch 2, 4 views), built like :func:`upfeat.train.engine.fit`
does, minus data loading. Each run is profiled with ``torch.profiler``; forward time is charged to
the innermost named section (``record_function`` around the functions below), backward time to the
section whose forward op created the autograd node (matched by sequence number, or by the node's
name for the custom ops). ``wall`` is the unprofiled median of ``--repeat`` runs, the profiled run
adds a few % of overhead. Say what else ran on the machine (``uptime``) when quoting it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
from collections import defaultdict

import torch
from _timing import median_time
from bench_speed import infer_times
from torch.profiler import ProfilerActivity, profile, record_function

import upfeat
from upfeat.jitter import apply_view, sample_views
from upfeat.train.config import TrainConfig
from upfeat.train.objective import MultiViewObjective
from upfeat.upsamplers import jbu

SECTIONS = ("backbone", "guidance", "range_features", "kernel", "fixup", "bicubic",
            "adaptive_conv", "residual", "view_warp", "downsampler", "loss", "optimizer")
# Backward nodes whose forward op carries no sequence number (custom autograd functions).
BY_NODE = {"FwdBackward": "adaptive_conv", "TrBackward": "adaptive_conv", "CorrBackward": "kernel",
           "BandBackward": "bicubic"}


def _scoped(name: str, fn):
    @functools.wraps(fn)
    def inner(*a, **kw):
        with record_function(f"§{name}"):
            return fn(*a, **kw)
    return inner


@contextlib.contextmanager
def instrument(upsampler: torch.nn.Module, objective: torch.nn.Module | None = None):
    """Wrap the JBU's building blocks (and the objective's loss parts) in named sections."""
    patches = [(jbu, "bicubic_padded", "bicubic"), (jbu, "adaptive_conv", "adaptive_conv"),
               (jbu, "jbu_kernel", "kernel"), (jbu, "resize_area", "guidance"),
               (jbu.JBULayer, "range_features", "range_features"), (jbu.JBULayer, "fixup", "fixup")]
    if objective is not None:
        import upfeat.train.objective as obj
        patches += [(obj, "apply_view", "view_warp")]
    saved = [(o, a, getattr(o, a)) for o, a, _ in patches]
    hooks = []

    def module_scope(mod, name):
        ctx = {}
        hooks.append(mod.register_forward_pre_hook(
            lambda m, i: ctx.__setitem__(id(m), record_function(f"§{name}").__enter__())))
        hooks.append(mod.register_forward_hook(lambda m, i, o: ctx.pop(id(m)).__exit__(None, None, None)))

    try:
        for o, a, name in patches:
            setattr(o, a, _scoped(name, getattr(o, a)))
        if upsampler.residual is not None:
            module_scope(upsampler.residual, "residual")
        if objective is not None:
            module_scope(objective.downsampler, "downsampler")
            objective.downsampler.guidance = _scoped("downsampler", objective.downsampler.guidance)
            module_scope(objective.criterion, "loss")
        yield
    finally:
        for o, a, fn in saved:
            setattr(o, a, fn)
        for h in hooks:
            h.remove()
        if objective is not None:
            del objective.downsampler.guidance


def breakdown(prof) -> dict[str, float]:
    """Seconds per section (``X bwd`` for backward), from a finished profiler."""
    events = prof.events()
    seq_scope: dict[int, str] = {}
    out: dict[str, float] = defaultdict(float)

    def scope_of(ev) -> str | None:
        p = ev
        while p is not None:
            if p.name.startswith("§"):
                return p.name[1:]
            p = p.cpu_parent
        return None

    for ev in events:
        if ev.name.startswith("§"):  # exclusive time of a section
            out[ev.name[1:]] += (ev.time_range.elapsed_us() - _child_section_time(ev)) / 1e6
        elif ev.sequence_nr >= 0 and not ev.name.startswith("autograd::engine"):
            s = scope_of(ev)
            if s is not None:
                seq_scope.setdefault(ev.sequence_nr, s)
    for ev in events:
        if ev.name.startswith(_NODE) and not _inside_node(ev):
            node = ev.name.split(": ", 1)[1]
            s = seq_scope.get(ev.sequence_nr) or BY_NODE.get(node.split("<")[0]) or "other"
            out[f"{s} bwd"] += ev.time_range.elapsed_us() / 1e6
    if os.environ.get("PROFILE_DEBUG"):
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
    return dict(out)


_NODE = "autograd::engine::evaluate_function: "


def _inside_node(ev) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith(_NODE):
            return True
        p = p.cpu_parent
    return False


def _child_section_time(ev) -> float:
    """Microseconds of ``ev`` spent in the nearest sections below it."""
    return sum(c.time_range.elapsed_us() if c.name.startswith("§") else _child_section_time(c)
               for c in ev.cpu_children)


def report(title: str, wall: float, parts: dict[str, float], total_profiled: float) -> None:
    print(f"\n== {title}: wall {wall * 1e3:.0f} ms (median, unprofiled); profiled "
          f"{total_profiled * 1e3:.0f} ms")
    keys = sorted(parts, key=lambda k: -parts[k])
    rest = total_profiled - sum(parts.values())
    for k in keys:
        print(f"  {k:<22} {parts[k] * 1e3:8.1f} ms  {100 * parts[k] / total_profiled:5.1f} %")
    print(f"  {'(unattributed)':<22} {rest * 1e3:8.1f} ms  {100 * rest / total_profiled:5.1f} %")


def profiled(fn) -> tuple[dict[str, float], float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("§root"):
            fn()
    parts = breakdown(prof)
    total = parts.pop("root", 0.0)
    roots = [e for e in prof.events() if e.name == "§root"]
    return {k: v for k, v in parts.items() if v > 0}, total + _child_section_time(roots[0]) / 1e6


def inference(size: int, repeat: int) -> None:
    model, x, low, t_bb, t_up = infer_times(size, repeat)
    with torch.inference_mode(), instrument(model.upsampler):
        parts, total = profiled(lambda: model.upsampler(low, x))
    print(f"\n{size}² inference: backbone {t_bb * 1e3:.0f} ms, JBU stack {t_up * 1e3:.0f} ms "
          f"(ratio {t_up / t_bb:.2f}x)")
    report(f"{size}² JBU stack inference (backbone excluded)", t_up, parts, total)


def train_step(size: int, repeat: int) -> None:
    cfg = TrainConfig(image_size=size)
    net = upfeat.backbones.create(cfg.backbone).requires_grad_(False).eval()
    torch.manual_seed(cfg.seed)
    objective = MultiViewObjective.from_config(cfg, [net.dim], [net.stride]).train()
    params = list(objective.parameters())
    opt = torch.optim.NAdam([{"params": [p for p in params if p.ndim > 0]},
                             {"params": [p for p in params if p.ndim == 0]}], lr=cfg.lr)
    image = torch.rand(cfg.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))

    def step(scoped: bool = False):
        ctx = record_function("§backbone") if scoped else contextlib.nullcontext()
        gen = torch.Generator().manual_seed(0)
        views = sample_views(cfg.views, torch.Generator().manual_seed(0), (size, size),
                             max_zoom=cfg.max_zoom, max_pad=cfg.max_pad)
        with torch.no_grad(), ctx:
            lr_feats = net(image)
            view_images = [apply_view(image, v) for v in views]
            view_feats = [net(v) for v in view_images]
        losses = objective(image, lr_feats, views, view_images, view_feats, gen)
        losses["loss"].backward()
        with record_function("§optimizer") if scoped else contextlib.nullcontext():
            opt.step()
            opt.zero_grad(set_to_none=True)

    wall = median_time(step, repeat)
    with instrument(objective.upsampler, objective):
        parts, total = profiled(lambda: step(True))
    report(f"{size}² training step (default TrainConfig, batch {cfg.batch_size}, {cfg.views} views)",
           wall, parts, total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-inference", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load average {os.getloadavg()}")
    for size in args.sizes:
        if not args.skip_inference:
            inference(size, args.repeat)
        if not args.skip_train:
            train_step(size, args.repeat)
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
