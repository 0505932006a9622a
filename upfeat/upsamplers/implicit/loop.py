"""The optimisation loop of :func:`fit_implicit`: resolution levels and one step's loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ... import downsamplers
from ...downsamplers import Downsampler
from ...jitter import warp_thetas
from ...losses import MultiViewLoss, tv_loss
from ...losses.projection import random_projection
from .encoding import pixel_centres
from .features import ImplicitFeatures
from .schedules import Schedule


@dataclass
class _Level:
    """One resolution of the fit: an ``(h, w)`` grid over the image and a downsampler of stride
    ``stride * h / H``.

    ``jitter``: shift the whole grid by a random sub-pixel offset at each step (coarse level).
    A fixed half-resolution grid would only constrain the field at its own sample points, and
    the full-resolution query shows stripes between them; random offsets train every position.
    Otherwise the inputs are fixed and cached.
    """

    xy: torch.Tensor        # (h*w, 2) pixel centres (x, y) in image pixels
    size: tuple[int, int]
    down: Downsampler
    jitter: bool
    cached: tuple | None = None  # inputs (N, 5), angles (N, 5F), base codes (N, k) or None

    def inputs(self, field: ImplicitFeatures, thetas: torch.Tensor, g: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Network inputs, their angles, the base map's codes and the views' affines for this
        step's grid."""
        if not self.jitter:
            if self.cached is None:
                x = field.inputs(self.xy)
                self.cached = (x, field.mlp.encoding.angles(x), field.base_codes(self.xy))
            return (*self.cached, thetas)
        (H, W), (h, w) = field.image_size, self.size
        cell = torch.tensor([W / w, H / h], dtype=self.xy.dtype)
        shift = ((torch.rand(2, generator=g, dtype=self.xy.dtype) - 0.5) * cell).to(self.xy.device)
        x = field.inputs(self.xy + shift)
        # The grid's pixel j now shows image point u_j + shift: sample it at (source - shift).
        thetas = thetas.clone()
        thetas[:, :, 2] -= shift * 2 / torch.tensor([W, H], dtype=shift.dtype, device=shift.device)
        return x, field.mlp.encoding.angles(x), field.base_codes(self.xy + shift), thetas


def _levels(field: ImplicitFeatures, stride: int, sched: Schedule) -> list[_Level]:
    """``[coarse, fine]`` (coarse: half resolution, half stride; only for an even stride) or
    ``[fine]``."""
    (H, W), dev = field.image_size, field.image.device
    out = []
    for f in ((2, 1) if sched.coarse > 0 and stride % 2 == 0 else (1,)):
        h, w, s = -(-H // f), -(-W // f), stride // f
        down = downsamplers.create(sched.downsampler, field.pca.k, s,
                                  kernel_size=max(1, round(sched.kernel * s))).to(dev)
        out.append(_Level(pixel_centres((h, w), (H, W), dev), (h, w), down, jitter=f > 1))
    return out


@torch.no_grad()
def _transfer(src: Downsampler, dst: Downsampler) -> None:
    """Start the fine downsampler where the coarse one ended: equal-shaped parameters are copied,
    ``(k, k)`` spatial maps are upsampled (nearest) to the fine window."""
    for (name, a), b in zip(src.named_parameters(), dst.parameters(), strict=True):
        if a.shape == b.shape:
            b.copy_(a)
        elif a.ndim == 2 and b.ndim == 2:
            b.copy_(F.interpolate(a[None, None], size=tuple(b.shape), mode="nearest")[0, 0])
        else:
            raise ValueError(f"cannot transfer downsampler parameter {name} {tuple(a.shape)} "
                             f"-> {tuple(b.shape)}")


def train(field: ImplicitFeatures, stride: int, thetas: torch.Tensor, targets: torch.Tensor,
           sched: Schedule, g: torch.Generator, progress: bool, bf16: bool = False) -> dict:
    """The optimisation loop; returns the last logged loss terms. ``bf16``: the MLP's hidden
    layers under bfloat16 autocast (their matrix products; norms stay float32)."""
    k, dev = field.pca.k, field.image.device
    levels = _levels(field, stride, sched)
    p = None if sched.proj_dim is None else min(sched.proj_dim, k)
    # σ = 1 for the first sigma_warmup of the steps, then the learned per-cell σ.
    crits = (MultiViewLoss(k, proj_dim=p, uncertainty=False).to(dev),
             MultiViewLoss(k, proj_dim=p, uncertainty=True).to(dev))
    params = [*field.mlp.parameters(), *crits[1].parameters(),
              *(q for lv in levels for q in lv.down.parameters())]
    opt = (torch.optim.NAdam if sched.optimizer == "nadam" else torch.optim.Adam)(params, sched.lr)
    n_coarse = round(sched.coarse * sched.steps) if len(levels) == 2 else 0
    n_fixed_sigma = round(sched.sigma_warmup * sched.steps)
    last: dict = {}
    bar = tqdm(range(sched.steps), desc=f"implicit fit ({sched.name})", disable=not progress,
               leave=False)
    for step in bar:
        if step == n_coarse and len(levels) == 2:
            _transfer(levels[0].down, levels[1].down)
        for group in opt.param_groups:
            group["lr"] = sched.lr_at(step)
        level = levels[0 if step < n_coarse else -1]
        idx = torch.randint(targets.shape[0], (sched.views,), generator=g)
        if sched.anchor:
            idx[0] = 0  # the pool's identity view
        proj = (torch.eye(k, device=dev) if p is None
                else random_projection(k, p, g, device=dev, dtype=level.xy.dtype))
        out = _loss(field, level, crits[int(step >= n_fixed_sigma)], thetas[idx], targets[idx],
                    proj, p is not None, sched.tv_weight, g, bf16)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if step % 10 == 0 or step == sched.steps - 1:
            last = {key: out[key].item() for key in ("loss", "nll", "tv")}
            bar.set_postfix(loss=f"{last['loss']:.3f}")
    return last


def _loss(field: ImplicitFeatures, level: _Level, crit: MultiViewLoss, thetas: torch.Tensor,
          targets: torch.Tensor, proj: torch.Tensor, projected: bool, tv_weight: float,
          g: torch.Generator, bf16: bool = False) -> dict[str, torch.Tensor]:
    """Multi-view loss of ``V`` views (``thetas (V, 2, 3)``, ``targets (V, k, h', w')``) + TV."""
    mlp, (h, w), k = field.mlp, level.size, field.pca.k
    x, angles, base, thetas = level.inputs(field, thetas, g)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        hid = mlp.hidden(x, angles).float()                         # (h*w, hidden)
    # Project the last layer instead of its output (c (+ 1) columns instead of k): the random
    # projection and the attention downsampler's saliency are both linear maps of the codes.
    sal = getattr(level.down, "saliency", None)
    m = proj if sal is None else torch.cat([proj, sal.weight.view(1, k).T], 1)
    z = torch.addmm(mlp.fc3.bias @ m, hid, mlp.fc3.weight.T @ m)   # (h*w, c [+ 1])
    if base is not None:
        z = z + base @ m
    c = proj.shape[1]
    z = z.T.reshape(1, m.shape[1], h, w)
    zv = warp_thetas(z, thetas)                                            # (V, c [+ 1], h, w)
    out = crit(targets, zv[:, :c], level.down, g, projection=proj if projected else None,
               hr_projected=projected, guidance=None if sal is None else zv[:, c:])
    # TV of the projected codes: an unbiased estimate of the codes' TV (E[P Pᵀ] = I).
    tv = tv_loss(z[:, :c]) if tv_weight > 0 else z.new_zeros(())
    return {**out, "loss": out["loss"] + tv_weight * tv, "tv": tv}
