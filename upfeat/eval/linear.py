"""Full-batch L-BFGS for linear models ``z = x @ W.T + b`` on many rows (probes, classifiers).

The loss and its gradients are computed in closed form, block by block (``CHUNK`` rows), so no
autograd graph over the ``(N, C)`` design matrix is kept and temporaries stay bounded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

HUBER_DELTA = 0.01
CHUNK = 65536  # rows per block: bounds the (rows, K) temporaries


def loss_grad(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
              kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss averaged over rows and its gradients w.r.t. ``w`` (K, C) and ``b`` (K,), in blocks.

    Args:
        x: ``(N, C)`` rows.  w: ``(K, C)``.  b: ``(K,)``.
        y: ``(N,)`` class ids for ``kind="ce"`` (softmax cross-entropy); ``(N, K)`` in {0, 1}
            for ``"bce"`` (multi-label, summed over the K labels); ``(N,)`` reals for ``"l2"``
            (half squared error) and ``"l1"`` (Huber with δ = ``HUBER_DELTA``, divided by δ:
            L1-like), both with ``K = 1``.
    """
    n = x.shape[0]
    loss = torch.zeros((), dtype=torch.float64)
    gw, gb = torch.zeros_like(w), torch.zeros_like(b)
    for i in range(0, n, CHUNK):
        xs, ys = x[i:i + CHUNK], y[i:i + CHUNK]
        z = torch.addmm(b, xs, w.T)
        if kind == "ce":
            lse = z.logsumexp(1)
            loss += (lse - z.gather(1, ys[:, None])[:, 0]).sum(dtype=torch.float64)
            g = (z - lse[:, None]).exp_()  # softmax - onehot
            g.scatter_add_(1, ys[:, None], torch.full_like(g[:, :1], -1.0))
        elif kind == "bce":
            loss += F.binary_cross_entropy_with_logits(z, ys, reduction="sum").double()
            g = torch.sigmoid(z) - ys
        else:
            r = z[:, 0] - ys
            if kind == "l2":
                loss += 0.5 * r.square().sum(dtype=torch.float64)
                g = r[:, None]
            else:  # Huber: quadratic within HUBER_DELTA, linear (L1) outside
                a, d = r.abs(), HUBER_DELTA
                loss += torch.where(a < d, 0.5 * r.square() / d, a - 0.5 * d).sum(dtype=torch.float64)
                g = (r / d).clamp(-1, 1)[:, None]
        gw.addmm_(g.T, xs)
        gb += g.sum(0)
    return loss / n, gw / n, gb / n


def lbfgs_linear(x: torch.Tensor, y: torch.Tensor, kind: str, bias: torch.Tensor, max_iter: int,
                 weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Full-batch L-BFGS for ``z = x @ W.T + b`` from ``W = 0``, ``b = bias`` (K,).

    Minimises ``loss(kind) + weight_decay / 2 * ||W||²``; returns ``W`` (K, C), ``b`` (K,) and
    ``{"iterations", "evals", "loss"}`` (final objective).
    """
    w = torch.zeros(bias.shape[0], x.shape[1], requires_grad=True)
    b = bias.detach().clone().float().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=10,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        with torch.no_grad():
            loss, gw, gb = loss_grad(x, y, w.detach(), b.detach(), kind)
            w.grad, b.grad = gw + weight_decay * w.detach(), gb
            return loss + 0.5 * weight_decay * w.detach().double().square().sum()

    opt.step(closure)
    state = opt.state[w]
    info = {"iterations": int(state.get("n_iter", 0)), "evals": int(state.get("func_evals", 0)),
            "loss": float(closure())}  # step() returns the *initial* loss: evaluate the final one
    return w.detach(), b.detach(), info
