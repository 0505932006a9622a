"""Tests of upfeat.ops.adaptive_conv / local_dot: every backend against the reference, gradcheck,
dtypes, layouts, errors, and the memory contract (no (B, C, k*k, H, W) tensor)."""
from __future__ import annotations

import itertools

import pytest
import torch

from upfeat._checks import ShapeError
from ._utils import MaxNumel as _MaxNumel
from upfeat.ops import (
    BACKENDS,
    adaptive_conv,
    adaptive_conv_reference,
    can_run,
    choose_backend,
    local_dot,
    local_dot_reference,
)

FAST = ["cpp", "shift"]  # backends compared with the reference on every shape


def _inputs(B, C, H, W, k, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(B, C, H + k - 1, W + k - 1, generator=g, dtype=dtype)
    w = torch.randn(B, H, W, k, k, generator=g, dtype=dtype)
    return feat.requires_grad_(requires_grad), w.requires_grad_(requires_grad)


# Shapes: B=2, non-square, k = 3, 5, 7, C = 1 and 5; the widest rows reach the vector tiles of
# the C++ kernel (16 doubles / 32 floats per tile) as well as its border tiles.
GRAD_SHAPES = [(2, C, H, W, k) for C in (1, 5) for k in (3, 5, 7) for (H, W) in ((3, 5), (4, 2))]
GRAD_SHAPES += [(2, 1, 2, 37, 7), (1, 9, 3, 19, 3)]


# Full Jacobians on the first shapes; the rest use gradcheck's fast mode (a random projection of
# the Jacobian, compared against the analytic vector-Jacobian product), which is what keeps the
# suite short.
FULL = {GRAD_SHAPES[0], GRAD_SHAPES[5], GRAD_SHAPES[-2]}


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_gradcheck_adaptive_conv(backend, shape):
    feat, w = _inputs(*shape, requires_grad=True)
    fn = lambda f, x: adaptive_conv(f, x, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (feat, w), fast_mode=shape not in FULL)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_gradcheck_local_dot(backend, shape):
    B, C, H, W, k = shape
    keys, _ = _inputs(*shape, requires_grad=True)
    query = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    fn = lambda q, x: local_dot(q, x, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (query, keys), fast_mode=shape not in FULL)


@pytest.mark.parametrize("shape", [(2, 3, 3, 4, 3), (1, 2, 2, 17, 5)], ids=str)
def test_gradgradcheck_cpp(shape):
    # The backward passes are built from the same differentiable ops, so second order works too.
    feat, w = _inputs(*shape, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda f, x: adaptive_conv(f, x, backend="cpp"), (feat, w))
    q = torch.randn(shape[0], shape[1], shape[2], shape[3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: local_dot(a, b, backend="cpp"), (q, feat))


SWEEP = [
    (1, 1, 1, 1, 1), (2, 3, 1, 1, 3), (1, 8, 16, 32, 7), (1, 16, 33, 70, 7), (3, 7, 9, 45, 5),
    (1, 13, 5, 100, 3), (2, 17, 12, 31, 9), (1, 384, 8, 40, 7),
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SWEEP, ids=str)
def test_matches_reference(backend, dtype, shape):
    """Outputs and both gradients equal the unfold+einsum reference (1e-5 in fp32)."""
    B, C, H, W, k = shape
    feat, w = _inputs(*shape, dtype=dtype, requires_grad=True)
    w_soft = torch.softmax(w.detach().flatten(3), -1).view_as(w).requires_grad_()  # JBU-like
    grad = torch.randn(B, C, H, W, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for weights in (w, w_soft):
        out = adaptive_conv(feat, weights, backend=backend)
        ref = adaptive_conv_reference(feat, weights)
        torch.testing.assert_close(out, ref, **tol)
        g_fast = torch.autograd.grad(out, (feat, weights), grad)
        g_ref = torch.autograd.grad(ref, (feat, weights), grad)
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * max(1, C / 16))
    q = torch.randn(B, C, H, W, dtype=dtype, requires_grad=True)
    torch.testing.assert_close(local_dot(q, feat, backend=backend), local_dot_reference(q, feat),
                               rtol=tol["rtol"], atol=tol["atol"] * max(1, C / 16))


def _featup_weight_grad(feat, w, grad):
    """The authors' CUDA filter gradient, transcribed: tap index ``blockIdx.z * blockIdx.z``."""
    k = w.shape[-1]
    H, W = w.shape[1:3]
    gw = torch.zeros_like(w)
    for t in range(k * k):
        tt = t * t  # the bug: should be t
        if tt < k * k:
            u, v = divmod(tt, k)
            gw[..., u, v] = (grad * feat[:, :, u : u + H, v : v + W]).sum(1)
    return gw


def _weight_grad_ok(gw, gw_ref):
    return all(torch.allclose(gw[..., u, v], gw_ref[..., u, v], rtol=1e-4, atol=1e-4)
               for u in range(gw.shape[-1]) for v in range(gw.shape[-1]))


def test_weight_gradient_reaches_every_tap():
    """The authors' kernel only fills taps 0,1,4,9,16,25,36; ours must match the reference on all 49."""
    feat, w = _inputs(1, 6, 10, 40, 7, dtype=torch.float32, requires_grad=True)
    grad = torch.randn(1, 6, 10, 40)
    (gw,) = torch.autograd.grad(adaptive_conv(feat, w, backend="cpp"), w, grad)
    (gw_ref,) = torch.autograd.grad(adaptive_conv_reference(feat, w), w, grad)
    assert (gw.abs().flatten(0, 2).amax(0) > 0).all(), "some taps receive no gradient"
    assert _weight_grad_ok(gw, gw_ref)
    # ...and the same check rejects the authors' gradient.
    assert not _weight_grad_ok(_featup_weight_grad(feat.detach(), w.detach(), grad), gw_ref)


def test_real_features(real_image):
    """Fast == reference on JBU-shaped data from a real photo: 2x-upsampled patch features of the
    image, weights from the JBU kernel guided by the image itself."""
    from upfeat.ops import jbu_kernel

    img = real_image(112, 160)  # (1, 3, 112, 160)
    lowres = torch.nn.functional.pixel_unshuffle(img, 4)  # (1, 48, 28, 40) "patch features"
    feats = torch.nn.functional.interpolate(lowres, scale_factor=4, mode="bicubic")
    feats = torch.nn.functional.pad(feats, [3, 3, 3, 3], mode="reflect").requires_grad_()
    proj = torch.nn.Conv2d(3, 16, 1)
    with torch.no_grad():
        w = jbu_kernel(proj(img), 5.0, 1.0, k=7)
    w = w.detach().requires_grad_()
    out = adaptive_conv(feats, w, backend="cpp")
    ref = adaptive_conv_reference(feats, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (feats, w), grad), torch.autograd.grad(ref, (feats, w), grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tap", [False, True])
def test_large_output_streams_past_the_caches_unchanged(tap):
    """Outputs over 32 MB are written with streaming stores (and fenced): same values as the
    shift backend, for both weight layouts (pixel-major and tap-major), and so is the gradient
    in feat (38.5 MB, 230-float rows that start anywhere in a cache line: tr's split stores)."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 96, 230, 230, generator=g)  # output 96 x 224 x 224 floats = 19 MB ...
    feat = torch.cat([feat, feat.flip(1)], 1)          # ... x 2 = 38.5 MB: streamed
    feat.requires_grad_()
    w = torch.randn(1, 224, 224, 7, 7, generator=g)
    if tap:  # the tap-major view adaptive_conv also accepts (see upfeat.ops.jbu_kernel)
        w = w.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    grad = torch.randn(1, 192, 224, 224, generator=g)
    out = adaptive_conv(feat, w, backend="cpp")
    ref = adaptive_conv(feat, w, backend="shift")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    (gf,), (gf_ref,) = (torch.autograd.grad(o, feat, grad) for o in (out, ref))
    torch.testing.assert_close(gf, gf_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", FAST)
def test_low_precision_accumulates_in_fp32(dtype, backend):
    feat, w = _inputs(2, 5, 6, 40, 7, dtype=torch.float32)
    feat, w = feat.to(dtype), w.to(dtype)
    out = adaptive_conv(feat, w, backend=backend)
    assert out.dtype == dtype
    truth = adaptive_conv_reference(feat.double(), w.double())
    # fp32 accumulation: within half an ulp of the exact sum (plus fp32 noise). Accumulating 49
    # products in fp16/bf16 would be off by several ulps.
    bound = (0.5 * torch.finfo(dtype).eps + 1e-5) * truth.abs() + 1e-6
    assert ((out.double() - truth).abs() <= bound).all()
    fl = feat.requires_grad_()
    adaptive_conv(fl, w, backend=backend).sum().backward()
    assert fl.grad.dtype == dtype and torch.isfinite(fl.grad.float()).all()


@pytest.mark.parametrize("backend", FAST)
def test_noncontiguous_and_channels_last(backend):
    feat, w = _inputs(2, 6, 9, 35, 5, dtype=torch.float32)
    expected = adaptive_conv_reference(feat, w)
    cl = feat.to(memory_format=torch.channels_last)
    feat_t = feat.transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides
    w_t = w.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)  # tap-major storage
    big = torch.zeros(2, 12, 9 + 4, 35 + 4)
    big[:, ::2] = feat
    for f, x in [(cl, w), (feat_t, w_t), (big[:, ::2], w), (feat, w[:, :, :, :, :])]:
        torch.testing.assert_close(adaptive_conv(f, x, backend=backend), expected, rtol=1e-5, atol=1e-5)


def test_fast_path_never_materialises_unfolded_tensor():
    B, C, H, W, k = 1, 32, 24, 40, 7
    feat, w = _inputs(B, C, H, W, k, dtype=torch.float32, requires_grad=True)
    q = torch.randn(B, C, H, W, requires_grad=True)
    with _MaxNumel() as m:
        out = adaptive_conv(feat, w, backend="cpp")
        out.backward(torch.randn_like(out))
        local_dot(q, feat, backend="cpp").sum().backward()
    assert m.max <= max(feat.numel(), w.numel()), m.max  # nothing bigger than an input
    assert m.max < B * C * k * k * H * W // 10
    with _MaxNumel() as m_ref:  # sanity: the reference does build it, so the probe works
        adaptive_conv_reference(feat, w)
    assert m_ref.max >= B * C * k * k * H * W


def test_torch_compile_traces_the_custom_op():
    feat, w = _inputs(1, 4, 6, 20, 3, dtype=torch.float32)
    fn = torch.compile(lambda f, x: adaptive_conv(f, x, backend="cpp") * 2, fullgraph=True)
    torch.testing.assert_close(fn(feat, w), 2 * adaptive_conv_reference(feat, w))


def test_backend_choice():
    cpu = torch.device("cpu")
    assert set(BACKENDS) == {"cpp", "compiled", "shift", "reference"}
    assert choose_backend(cpu) == "cpp"
    assert can_run("shift", cpu) and not can_run("cpp", torch.device("meta"))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        choose_backend(cpu, "fast")
    with pytest.raises(ValueError, match="CPU tensors only"):
        can_run("cpp", torch.device("meta"), raise_error=True)


def _err(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_clear_errors():
    feat, w = _inputs(2, 3, 5, 6, 3, dtype=torch.float32)
    _err(lambda: adaptive_conv(feat[0], w), ShapeError, r"feat must have shape \(B, C, H\+k-1, W\+k-1\)")
    _err(lambda: adaptive_conv(feat, w[..., 0]), ShapeError, r"weights must have shape \(B, H, W, k, k\)")
    _err(lambda: adaptive_conv(feat[:, :, 1:], w), ShapeError, r"expected feat of shape \(2, C, 7, 8\)")
    _err(lambda: adaptive_conv(feat[:1], w), ShapeError, "does not fit weights")
    _err(lambda: adaptive_conv(feat, w.double()), TypeError, "dtype mismatch: feat.dtype=torch.float32")
    _err(lambda: adaptive_conv(feat.long(), w), TypeError, "feat must be a floating-point tensor")
    _err(lambda: adaptive_conv(feat, w.to("meta")), ValueError, "device mismatch")
    even = torch.randn(2, 5, 6, 4, 4)
    _err(lambda: adaptive_conv(torch.randn(2, 3, 8, 9), even), ShapeError, "k odd")
    _err(lambda: adaptive_conv(feat, torch.randn(2, 5, 6, 3, 5)), ShapeError, r"end in \(k, k\)")
    _err(lambda: adaptive_conv(feat.numpy(), w), TypeError, "feat must be a torch.Tensor")
    _err(lambda: adaptive_conv(feat, w, backend="cuda"), ValueError, "unknown backend")
    q = torch.randn(2, 3, 5, 6)
    _err(lambda: local_dot(q, feat[:, :, :, :-1]), ShapeError, "same odd k on both axes")
    _err(lambda: local_dot(q, feat[:, :2]), ShapeError, "do not fit query")


def _raw_op_calls():
    """Direct calls of the C++ ops with every size relation broken once (no Python checks)."""
    B, C, H, W, k = 2, 3, 5, 6, 3
    f = torch.randn(B, C, H + k - 1, W + k - 1)
    g, a = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    tap, hwk = torch.randn(B, k * k, H, W), torch.randn(B, H, W, k * k)
    ops = torch.ops.upfeat
    return {
        "fwd feat too small": lambda: ops.acv_fwd(f[:, :, :-2, :-2].contiguous(), tap, k, True),
        "fwd feat too wide": lambda: ops.acv_fwd(torch.randn(B, C, H + k - 1, W + k + 3), tap, k, True),
        "fwd batch": lambda: ops.acv_fwd(f[:1].contiguous(), tap, k, True),
        "fwd k vs taps": lambda: ops.acv_fwd(f, tap, 5, True),
        "fwd even k": lambda: ops.acv_fwd(f, torch.randn(B, 4, H, W), 2, True),
        "fwd pixel-major taps": lambda: ops.acv_fwd(f, hwk[..., :-1].contiguous(), k, False),
        "fwd 3-D weights": lambda: ops.acv_fwd(f, tap[0], k, True),
        "fwd dtype": lambda: ops.acv_fwd(f, tap.double(), k, True),
        "tr batch": lambda: ops.acv_tr(g[:1].contiguous(), tap, k, True),
        "tr size": lambda: ops.acv_tr(g[:, :, :-1].contiguous(), tap, k, True),
        "tr k": lambda: ops.acv_tr(g, tap, 7, True),
        "corr p too small": lambda: ops.acv_corr(a, f[:, :, :-1].contiguous(), k, True),
        "corr channels": lambda: ops.acv_corr(a, f[:, :2].contiguous(), k, True),
        "corr batch": lambda: ops.acv_corr(a[:1].contiguous(), f, k, False),
        "corr k": lambda: ops.acv_corr(a, f, 5, True),
        "band sizes": lambda: ops.band_matmul(a, torch.randn(7, H + 1), torch.randn(8, W)),
        "band dtype": lambda: ops.band_matmul(a, torch.randn(7, H).double(), torch.randn(8, W)),
    }


@pytest.mark.parametrize("case", list(_raw_op_calls()))
def test_raw_cpp_ops_reject_mismatched_shapes(case):
    """Issue 17: a direct torch.ops.upfeat call with inconsistent sizes raises, never reads out of
    bounds (the Python front door checks too, but the ops are public through torch.ops)."""
    if not can_run("cpp", torch.device("cpu")):
        pytest.skip("C++ kernel unavailable")
    with pytest.raises(RuntimeError):
        _raw_op_calls()[case]()


def test_raw_cpp_ops_accept_consistent_shapes():
    if not can_run("cpp", torch.device("cpu")):
        pytest.skip("C++ kernel unavailable")
    feat, w = _inputs(2, 3, 5, 6, 3, dtype=torch.float64)
    tap = w.permute(0, 3, 4, 1, 2).reshape(2, 9, 5, 6).contiguous()
    out = torch.ops.upfeat.acv_fwd(feat, tap, 3, True)
    torch.testing.assert_close(out, adaptive_conv_reference(feat, w))
    assert torch.ops.upfeat.acv_tr(out, tap, 3, True).shape == feat.shape
    assert torch.ops.upfeat.acv_corr(out, feat, 3, False).shape == (2, 5, 6, 9)


@pytest.mark.parametrize("W", [5, 16, 37])  # the transpose's 16-pixel blocks: partial, whole, both
def test_raw_to_tap_is_the_permute(W):
    if not can_run("cpp", torch.device("cpu")):
        pytest.skip("C++ kernel unavailable")
    w = torch.randn(2, 3, W, 9)
    assert torch.equal(torch.ops.upfeat.acv_to_tap(w, 3), w.permute(0, 3, 1, 2))
    tm = torch.randn(2, 3, 4, W)  # corr's pixel-major result, transposed per row from its tap-major sums
    p = torch.randn(2, 3, 4 + 2, W + 2)
    torch.testing.assert_close(torch.ops.upfeat.acv_corr(tm, p, 3, False),
                               torch.ops.upfeat.acv_corr(tm, p, 3, True).permute(0, 2, 3, 1), rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        torch.ops.upfeat.acv_to_tap(w, 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["compiled", "shift"])
def test_cuda_matches_cpu_reference(backend):
    for B, C, H, W, k in itertools.islice(SWEEP, 2, 6):
        feat, w = _inputs(B, C, H, W, k, dtype=torch.float32, requires_grad=True)
        ref = adaptive_conv_reference(feat, w)
        fc, wc = feat.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
        out = adaptive_conv(fc, wc, backend=backend)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
        grad = torch.randn_like(ref)
        out.backward(grad.cuda())
        ref.backward(grad)
        torch.testing.assert_close(fc.grad.cpu(), feat.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(wc.grad.cpu(), w.grad, rtol=1e-4, atol=1e-3)


def test_output_pool_recycles_without_leaking_values():
    from upfeat.ops import cached_bytes, empty_cache

    feat, w = _inputs(1, 384, 48, 64, 3, dtype=torch.float32)  # output 4.7 MB: pooled
    empty_cache()
    first = adaptive_conv(feat, w, backend="cpp")
    expected = first.clone()
    ptr = first.data_ptr()
    del first
    assert cached_bytes() >= expected.numel() * 4
    second = adaptive_conv(feat * 2, w, backend="cpp")  # reuses the freed block...
    assert second.data_ptr() == ptr
    torch.testing.assert_close(second, 2 * expected)  # ...and overwrites every value
    del second
    assert empty_cache() >= expected.numel() * 4 and cached_bytes() == 0


@pytest.mark.skipif(not can_run("cpp", torch.device("cpu")), reason="no C++ kernel")
def test_cpp_subnormal_inputs_count_as_zero_and_mode_is_restored():
    # The C++ kernels flush subnormals (products touching them take a ~10x slower CPU path; sharp
    # JBU kernels' gradients are full of them): subnormal weights contribute exactly nothing...
    feat, _ = _inputs(1, 3, 5, 40, 3, dtype=torch.float32)
    tiny = torch.full((1, 5, 40, 3, 3), 1e-40)  # subnormal in float32
    assert torch.count_nonzero(adaptive_conv(feat, tiny, backend="cpp")) == 0
    # ... and the caller's floating-point mode is back afterwards (torch keeps subnormals).
    assert (torch.tensor([1e-40]) * 1.0).item() != 0


@pytest.mark.parametrize("backend", ["cpp", "shift"])
@pytest.mark.parametrize("B", [1, 2])
def test_out_writes_into_a_channel_slice(backend, B):
    """``out=`` a channel slice of a larger tensor: the same values as the returned result, the
    other channels untouched; the cpp backend writes in place (no temporary block)."""
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(B, 5, 10, 13, generator=gen)
    w = torch.softmax(torch.randn(B, 8, 11, 9, generator=gen), -1).view(B, 8, 11, 3, 3)
    big = torch.full((B, 9, 8, 11), 7.0)
    res = adaptive_conv(feat, w, backend=backend, out=big[:, 2:7])
    torch.testing.assert_close(big[:, 2:7], adaptive_conv(feat, w, backend=backend), rtol=0, atol=0)
    assert res.data_ptr() == big[:, 2].data_ptr() and (big[:, :2] == 7).all() and (big[:, 7:] == 7).all()
    with pytest.raises(ShapeError, match="out must have shape"):
        adaptive_conv(feat, w, backend=backend, out=big[:, 2:6])
    with pytest.raises(RuntimeError, match="does not support autograd"):
        adaptive_conv(feat.requires_grad_(), w, backend=backend, out=big[:, 2:7])


@pytest.mark.skipif(not can_run("cpp", torch.device("cpu")), reason="no C++ kernel")
def test_cache_limit_zero_returns_every_block_and_restores():
    from upfeat.ops import cached_bytes, empty_cache
    from upfeat.ops.adaptive_conv import cpu

    feat, w = _inputs(1, 384, 48, 64, 3, dtype=torch.float32)  # output 4.7 MB: pooled
    empty_cache()
    old = cpu.set_cache_limit(0)
    try:
        del_me = adaptive_conv(feat, w, backend="cpp")
        del del_me
        assert cached_bytes() == 0  # freed straight back to the OS
    finally:
        assert cpu.set_cache_limit(old) == 0.0
    out = adaptive_conv(feat, w, backend="cpp")
    del out
    assert cached_bytes() > 0  # the default limit again
    with pytest.raises(ValueError, match=">= 0 MB"):
        cpu.set_cache_limit(-1)
    empty_cache()
