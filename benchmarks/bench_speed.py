"""The issue-16 speed ratios, each measured within one process (so both sides see the same load).

    python benchmarks/bench_speed.py                 # all three
    python benchmarks/bench_speed.py --only train --steps 5

- ``op``: ``adaptive_conv`` forward+backward at 224² (B=1, C=384, k=7) vs the ``torch.compile``'d
  shift loop (acceptance: >= 10x).
- ``infer``: the shipped JBU stack (``create_model("vits14_focus", "jbu")``, inference mode,
  batch 1) vs the backbone alone, at 448² (acceptance: stack <= 1.5x backbone, 2 threads).
- ``train``: seconds per training step at the default :class:`~upfeat.train.TrainConfig`
  (vits14_focus, jbu_stack, batch 2, 4 views, 224²), random images, median of ``--steps``.
  To compare two versions run this script under each (``PYTHONPATH``) alternately.

Prints one JSON line per measurement with the load average before and after it.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from _timing import median_time

import upfeat


def _emit(**row) -> None:
    print(json.dumps({**row, "load": os.getloadavg()[0], "upfeat": os.path.dirname(upfeat.__file__)}),
          flush=True)


def op(repeat: int) -> None:
    from upfeat.ops import adaptive_conv
    from upfeat.ops.adaptive_conv.shift import adaptive_conv_shift
    torch.manual_seed(0)
    feat = torch.randn(1, 384, 230, 230, requires_grad=True)
    w = torch.randn(1, 224, 224, 7, 7, requires_grad=True)
    grad = torch.randn(1, 384, 224, 224)
    compiled = torch.compile(adaptive_conv_shift, dynamic=False)

    def run(fn):
        def step():
            fn(feat, w).backward(grad)
            feat.grad = w.grad = None
        return step
    t_fast = median_time(run(lambda f, x: adaptive_conv(f, x, backend="cpp")), repeat)
    t_comp = median_time(run(compiled), repeat)
    _emit(what="op_fwd_bwd_224", fast_s=t_fast, compiled_s=t_comp, ratio=t_comp / t_fast)


def infer_times(size: int, repeat: int):
    """(model, image, low-res features, backbone s, JBU stack s) for one ``size``² image."""
    model = upfeat.create_model("vits14_focus", "jbu").eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        low = model.lowres(x)
        t_bb = median_time(lambda: model.lowres(x), repeat)
        t_up = median_time(lambda: model.upsampler(low, x), repeat)
    return model, x, low, t_bb, t_up


def infer(size: int, repeat: int) -> None:
    *_, t_bb, t_up = infer_times(size, repeat)
    _emit(what=f"infer_{size}", backbone_s=t_bb, jbu_s=t_up, ratio=t_up / t_bb)


def train(steps: int) -> None:
    from upfeat.jitter import apply_view, sample_views
    from upfeat.train.config import TrainConfig
    from upfeat.train.objective import MultiViewObjective
    cfg = TrainConfig()
    net = upfeat.backbones.create(cfg.backbone).requires_grad_(False).eval()
    torch.manual_seed(cfg.seed)
    objective = MultiViewObjective.from_config(cfg, [net.dim], [net.stride]).train()
    opt = torch.optim.NAdam(objective.parameters(), lr=cfg.lr)
    size = cfg.image_size
    image = torch.rand(cfg.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    views = sample_views(cfg.views, torch.Generator().manual_seed(0), (size, size))
    with torch.no_grad():
        lr_feats = net(image)
        view_images = [apply_view(image, v) for v in views]
        view_feats = [net(v) for v in view_images]

    def step(with_backbone: bool):
        if with_backbone:
            with torch.no_grad():
                net(image)
                [net(v) for v in view_images]
        losses = objective(image, lr_feats, views, view_images, view_feats,
                           torch.Generator().manual_seed(0))
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_obj = median_time(lambda: step(False), steps)
    t_all = median_time(lambda: step(True), steps)
    _emit(what="train_step_224", step_s=t_all, without_backbone_s=t_obj)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["op", "infer", "train"], nargs="+", default=["op", "infer", "train"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, default=448)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if "op" in args.only:
        op(args.repeat)
    if "infer" in args.only:
        infer(args.size, args.repeat)
    if "train" in args.only:
        train(args.steps)


if __name__ == "__main__":
    main()
