"""Tests of upfeat.ops.band_matmul: the banded C++ product equals the dense one, its gradient is
the adjoint (gradcheck, twice), and the JBU's bicubic step equals F.interpolate + reflect pad."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upfeat._checks import ShapeError
from upfeat.ops import band_matmul, can_run
from upfeat.upsamplers.jbu import _bicubic_matrix, bicubic_padded

pytestmark = pytest.mark.skipif(not can_run("cpp", torch.device("cpu")), reason="no C++ kernel")

# (h, w) -> (H, W), radius r: x2 steps, the x1.75 last step of a /14 stack, odd sizes, inputs
# smaller than the 4-tap band and than the padding (edge replication).
CASES = [((8, 8), (16, 16), 3), ((16, 16), (28, 28), 3), ((5, 7), (9, 14), 3), ((3, 2), (6, 4), 3),
         ((2, 2), (4, 4), 3), ((1, 1), (2, 2), 1), ((20, 3), (20, 35), 2)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_dense_product(case):
    (h, w), (H, W), r = case
    x = torch.randn(2, 5, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ah, aw = _bicubic_matrix(h, H, r, x), _bicubic_matrix(w, W, r, x)
    torch.testing.assert_close(band_matmul(x, ah, aw, backend="cpp"), ah @ x @ aw.T)


def test_any_dense_matrix_and_float32():
    g = torch.Generator().manual_seed(1)
    x, ah, aw = torch.randn(1, 3, 6, 40, generator=g), torch.randn(7, 6, generator=g), torch.randn(37, 40, generator=g)
    torch.testing.assert_close(band_matmul(x, ah, aw, backend="cpp"), ah @ x @ aw.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wide_planes_both_pass_orders(dtype):
    # Wider than the vector blocks (full blocks, row groups and tails), upsampling (W pass
    # first) and its adjoint (downsampling: H pass first).
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 27, 50, dtype=dtype, generator=g)
    ah, aw = _bicubic_matrix(27, 54, 3, x), _bicubic_matrix(50, 101, 3, x)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(band_matmul(x, ah, aw, backend="cpp"), ah @ x @ aw.T, **tol)
    y = torch.randn(1, 3, 60, 107, dtype=dtype, generator=g)
    torch.testing.assert_close(band_matmul(y, ah.T, aw.T, backend="cpp"), ah.T @ y @ aw, **tol)


@pytest.mark.parametrize("case", CASES[2:5], ids=str)
def test_gradcheck_twice(case):
    (h, w), (H, W), r = case
    x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    ah, aw = _bicubic_matrix(h, H, r, x), _bicubic_matrix(w, W, r, x)
    fn = lambda z: band_matmul(z, ah, aw, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_bicubic_padded_is_interpolate_then_reflect():
    x = torch.randn(1, 4, 9, 13, dtype=torch.float64)
    ref = F.pad(F.interpolate(x, (16, 23), mode="bicubic", align_corners=False), [3] * 4, mode="reflect")
    # the bicubic coefficients are float32 (see _bicubic_matrix): agreement to ~1e-6, not 1e-15
    torch.testing.assert_close(bicubic_padded(x, (16, 23), 3), ref, rtol=1e-5, atol=1e-5)


def test_errors():
    x = torch.randn(1, 2, 4, 5)
    with pytest.raises(ShapeError, match="ah \\(Ho, h\\)"):
        band_matmul(x, torch.randn(8, 5), torch.randn(10, 5))
    with pytest.raises(ValueError, match="backend"):
        band_matmul(x, torch.randn(8, 4), torch.randn(10, 5), backend="gpu")


def test_subnormal_inputs_count_as_zero():
    # flushed like in the adaptive-conv kernels (a ~10x slower CPU path otherwise)
    x = torch.full((1, 2, 6, 7), 1e-40)  # subnormal in float32
    ah, aw = _bicubic_matrix(6, 12, 3, x), _bicubic_matrix(7, 14, 3, x)
    assert torch.count_nonzero(band_matmul(x, ah, aw, backend="cpp")) == 0
    assert (torch.tensor([1e-40]) * 1.0).item() != 0
