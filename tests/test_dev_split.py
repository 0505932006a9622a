"""benchmarks/dev_split.py: the development split keeps apart what the probe trains and scores on,
and its guided filter is He et al.'s (exact on known answers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from upfeat.eval.datasets import open_dataset

from ._utils import load_benchmark


def _script():
    return load_benchmark("dev_split")


def test_split_is_train_data_only_and_disjoint(data_dir):
    split = _script().dev_split(14)
    val = {p[0] for p in open_dataset(data_dir / "camvid", "val").pairs}
    (ctr, cev), (dtr, dev) = split["camvid"], split["davis"]
    assert (len(ctr), len(cev)) == (55, 34)
    assert not {p[0] for p in ctr.pairs + cev.pairs} & val
    seq = lambda ds: {p[0].split("_")[0] for p in ds.pairs}  # noqa: E731
    assert seq(ctr) == {"0001TP", "0006R0"} and seq(cev) == {"0016E5"}
    dseq = lambda ds: {p[0].split("/")[0] for p in ds.pairs}  # noqa: E731
    assert len(dseq(dtr)) == 4 and len(dseq(dev)) == 3 and not dseq(dtr) & dseq(dev)
    assert ctr.size == (224, 294) and dtr.size == (224, 392)


def test_box_is_the_clipped_window_mean():
    box = _script().box
    x = torch.randn(2, 3, 9, 13, dtype=torch.float64)
    for r in (1, 2, 5):
        ref = F.avg_pool2d(x, 2 * r + 1, 1, r, count_include_pad=False)
        torch.testing.assert_close(box(x, r), ref)


def test_guided_filter_known_answers():
    gf = _script().guided_filter
    torch.manual_seed(0)
    guide = torch.rand(1, 3, 20, 24, dtype=torch.float64)
    # a feature that is an affine function of the guide is reproduced exactly (eps -> 0) ...
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, 1, dtype=torch.float64)
    p = torch.einsum("cj,bjhw->bchw", a, guide) + b
    torch.testing.assert_close(gf(guide, p, 3, 1e-12), p, atol=1e-6, rtol=0)
    # ... a constant stays constant at any eps, also through the fast (1/s) coefficients
    const = torch.full((1, 2, 20, 24), 1.5, dtype=torch.float64)
    for s in (1, 2):
        torch.testing.assert_close(gf(guide, const, 4, 1e-2, s), const)
    # and a large eps makes it the box mean of p (a -> 0)
    q = torch.randn(1, 2, 20, 24, dtype=torch.float64)
    torch.testing.assert_close(gf(guide, q, 2, 1e9), _script().box(_script().box(q, 2), 2))
