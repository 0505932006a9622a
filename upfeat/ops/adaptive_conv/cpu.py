"""Fast CPU backend: a C++/OpenMP extension built on first use with ``torch.utils.cpp_extension``.

The three kernels (``fwd``, ``tr``, ``corr``, see ``csrc/adaptive_conv.cpp``) are registered as
``torch.library`` custom ops (so ``torch.compile`` can trace through them) and combined into
autograd functions whose backward passes call each other, which makes the op differentiable any
number of times.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SRCS = [Path(__file__).with_name("csrc") / f
         for f in ("adaptive_conv.cpp", "band_matmul.cpp", "tap_softmax.cpp", "simd.h")]


def _cpu_tag() -> str:
    # The build uses -march=native: key the cache on the CPU so a shared home dir never loads a
    # binary built for another processor.
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        pass
    return platform.machine() + flags


@functools.cache
def load_extension():
    """Build (once per machine, cached under ``TORCH_EXTENSIONS_DIR``) and import the extension.

    Raises:
        RuntimeError: if it cannot be built (no C++ compiler, no ninja, ...).
    """
    # cpp_extension warns about a missing CUDA runtime on import; irrelevant for a CPU build.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    srcs = {p.name: p.read_bytes() for p in _SRCS}
    key = hashlib.sha1(b"".join(srcs.values()) + _cpu_tag().encode()
                       + torch.__version__.encode()).hexdigest()[:12]
    # Compile a snapshot of exactly the bytes hashed: the build runs later and may take minutes;
    # the files may change meanwhile (an edit, a checkout), which must not land under this key.
    # Per user (not a shared /tmp name another user could own or swap before the compile).
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    snap = cache / "upfeat" / f"src_{key}"
    try:
        snap.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, data in srcs.items():
            if not (snap / name).is_file() or (snap / name).read_bytes() != data:
                tmp = snap / f".{name}.{os.getpid()}"
                tmp.write_bytes(data)
                tmp.replace(snap / name)  # atomic: concurrent builders see whole files
    except OSError as e:
        raise RuntimeError(f"could not write the upfeat C++ kernel sources to {snap}: {e}") from None
    # torch adds the -std it needs; native vector width (AVX-512 here) for the 64-byte tiles
    native = "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native"
    flags = ["-O3", "-fopenmp", native]
    try:
        ext = cpp_extension.load(
            name=f"upfeat_adaptive_conv_{key}",
            sources=[str(snap / name) for name in srcs if name.endswith(".cpp")],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=os.environ.get("UPFEAT_VERBOSE_BUILD") == "1",
        )
    except Exception as e:  # noqa: BLE001 - surface any build failure as one clear error
        raise RuntimeError(
            f"could not build the upfeat C++ kernel ({type(e).__name__}: ...{str(e)[-800:]}). It "
            "needs a C++ compiler (g++) and ninja; set UPFEAT_VERBOSE_BUILD=1 to see the build "
            "log, or pass backend='shift' to use the pure-torch path."
        ) from e
    ext.set_cache_limit(_pool_bytes())
    return ext


_POOL_MB: list[float] = []  # set_cache_limit's value, which takes precedence over UPFEAT_POOL_MB


def _pool_bytes() -> int:
    mb = _POOL_MB[0] if _POOL_MB else float(os.environ.get("UPFEAT_POOL_MB", "1024"))
    return int(mb * 2**20)


def set_cache_limit(mb: float | None) -> float | None:
    """Keep at most ``mb`` MB of freed output buffers (0: none, every block goes back to the OS;
    ``None``: ``UPFEAT_POOL_MB``, default 1024). Applies now, or when the extension loads.
    Returns the previous setting (``None`` if there was none), for restoring it."""
    if mb is not None and not mb >= 0:
        raise ValueError(f"cache limit must be >= 0 MB, got {mb!r}")
    old = _POOL_MB[0] if _POOL_MB else None
    _POOL_MB[:] = [] if mb is None else [float(mb)]
    if _loaded():
        load_extension().set_cache_limit(_pool_bytes())
    return old


def empty_cache() -> int:
    """Return the pooled output buffers of the C++ kernels to the OS; returns the bytes freed.

    Outputs of 4 MB and more are recycled (fresh pages cost ~12 ms per 77 MB to zero here). At
    most ``UPFEAT_POOL_MB`` (default 1024) MB of freed buffers are kept.
    """
    return load_extension().empty_cache() if _loaded() else 0


def empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Uninitialised CPU tensor of ``like``'s dtype from the output pool (for large results
    assembled piece by piece: recycled, huge-page backed blocks fault in ~no fresh pages)."""
    return load_extension().empty(list(shape), like)


def cached_bytes() -> int:
    """Bytes currently held by the output pool."""
    return load_extension().cached_bytes() if _loaded() else 0


def _loaded() -> bool:
    return load_extension.cache_info().currsize > 0


def is_available() -> bool:
    """True if the extension builds and loads on this machine."""
    try:
        load_extension()
        return True
    except RuntimeError as e:
        log.warning("%s", e)
        return False


# Weight-like tensors (the weights, the correlation output) are either tap-major (B, k*k, H, W) or
# pixel-major (B, H, W, k*k); ``tap`` says which, so no layout copy happens outside the kernels.


def _hw(w: torch.Tensor, tap: bool) -> tuple[int, int]:
    return (w.shape[2], w.shape[3]) if tap else (w.shape[1], w.shape[2])


@torch.library.custom_op("upfeat::acv_fwd", mutates_args=(), device_types="cpu")
def _fwd(feat: torch.Tensor, w: torch.Tensor, k: int, tap: bool) -> torch.Tensor:
    return load_extension().fwd(feat, w, k, tap)


@_fwd.register_fake
def _(feat, w, k, tap):
    return feat.new_empty(feat.shape[0], feat.shape[1], *_hw(w, tap))


@torch.library.custom_op("upfeat::acv_fwd_into", mutates_args=("out",), device_types="cpu")
def fwd_into(feat: torch.Tensor, w: torch.Tensor, k: int, tap: bool, out: torch.Tensor) -> None:
    """:func:`_fwd` written into ``out`` (B, C, H, W), whose (C, H, W) blocks are contiguous (a
    channel slice of a larger output). No autograd."""
    load_extension().fwd_into(feat, w, k, tap, out)


@torch.library.custom_op("upfeat::tap_softmax_", mutates_args=("logits",), device_types="cpu")
def tap_softmax_(logits: torch.Tensor, log_s: torch.Tensor, threshold: float) -> None:
    """In place on tap-major float32 logits (B, K2, H, W): ``softmax_t(logits + log_s[t])``,
    then 0 below ``threshold``. One pass over memory (torch's ops take five). No autograd."""
    load_extension().tap_softmax_(logits, log_s, threshold)


@torch.library.custom_op("upfeat::acv_to_tap", mutates_args=(), device_types="cpu")
def _to_tap(w: torch.Tensor, k: int) -> torch.Tensor:
    return load_extension().to_tap(w, k)


@_to_tap.register_fake
def _(w, k):
    return w.new_empty(w.shape[0], k * k, w.shape[1], w.shape[2])


@torch.library.custom_op("upfeat::acv_tr", mutates_args=(), device_types="cpu")
def _tr(g: torch.Tensor, w: torch.Tensor, k: int, tap: bool) -> torch.Tensor:
    return load_extension().tr(g, w, k, tap)


@_tr.register_fake
def _(g, w, k, tap):
    return g.new_empty(g.shape[0], g.shape[1], g.shape[2] + k - 1, g.shape[3] + k - 1)


@torch.library.custom_op("upfeat::acv_corr", mutates_args=(), device_types="cpu")
def _corr(a: torch.Tensor, p: torch.Tensor, k: int, tap: bool) -> torch.Tensor:
    return load_extension().corr(a, p, k, tap)


@_corr.register_fake
def _(a, p, k, tap):
    B, _, H, W = a.shape
    return a.new_empty(B, k * k, H, W) if tap else a.new_empty(B, H, W, k * k)


class Fwd(torch.autograd.Function):
    """(feat (B,C,Hp,Wp), w (B,K2,H,W) or (B,H,W,K2)) -> (B,C,H,W)."""

    @staticmethod
    def forward(ctx, feat, w, k, tap):
        ctx.k, ctx.tap = k, tap
        if tap or not ctx.needs_input_grad[0]:
            ctx.save_for_backward(feat, w, None)
            return _fwd(feat, w, k, tap)
        # Pixel-major weights and tr will be needed: convert once, for this forward and for the
        # first-order backward's tr (which would otherwise convert the same weights again).
        wt = _to_tap(w, k)
        ctx.save_for_backward(feat, w, wt)
        return _fwd(feat, wt, k, True)

    @staticmethod
    def backward(ctx, go):
        feat, w, wt = ctx.saved_tensors
        go = go.contiguous()
        # The tap-major copy is a constant to autograd: only without create_graph may tr use it.
        tr_w, tr_tap = (wt, True) if wt is not None and not torch.is_grad_enabled() else (w, ctx.tap)
        gf = Tr.apply(go, tr_w, ctx.k, tr_tap) if ctx.needs_input_grad[0] else None
        gw = Corr.apply(go, feat, ctx.k, ctx.tap) if ctx.needs_input_grad[1] else None
        return gf, gw, None, None


class Tr(torch.autograd.Function):
    """Adjoint of :class:`Fwd` in ``feat``: (g (B,C,H,W), w) -> (B,C,Hp,Wp)."""

    @staticmethod
    def forward(ctx, g, w, k, tap):
        ctx.save_for_backward(g, w)
        ctx.k, ctx.tap = k, tap
        return _tr(g, w, k, tap)

    @staticmethod
    def backward(ctx, go):
        g, w = ctx.saved_tensors
        go = go.contiguous()
        gg = Fwd.apply(go, w, ctx.k, ctx.tap) if ctx.needs_input_grad[0] else None
        gw = Corr.apply(g, go, ctx.k, ctx.tap) if ctx.needs_input_grad[1] else None
        return gg, gw, None, None


class Corr(torch.autograd.Function):
    """Local correlation: (a (B,C,H,W), p (B,C,Hp,Wp)) -> (B,K2,H,W) or (B,H,W,K2)."""

    @staticmethod
    def forward(ctx, a, p, k, tap):
        ctx.save_for_backward(a, p)
        ctx.k, ctx.tap = k, tap
        return _corr(a, p, k, tap)

    @staticmethod
    def backward(ctx, go):
        a, p = ctx.saved_tensors
        go = go.contiguous()
        ga = Fwd.apply(p, go, ctx.k, ctx.tap) if ctx.needs_input_grad[0] else None
        gp = Tr.apply(a, go, ctx.k, ctx.tap) if ctx.needs_input_grad[1] else None
        return ga, gp, None, None


@torch.library.custom_op("upfeat::band_matmul", mutates_args=(), device_types="cpu")
def _band(x: torch.Tensor, ah: torch.Tensor, aw: torch.Tensor) -> torch.Tensor:
    return load_extension().band_matmul(x, ah, aw)


@_band.register_fake
def _(x, ah, aw):
    return x.new_empty(x.shape[0], x.shape[1], ah.shape[0], aw.shape[0])


class Band(torch.autograd.Function):
    """``ah @ x @ aw^T`` per (b, c) for banded constant matrices; differentiable in ``x`` only
    (the adjoint is the same op on the transposes, so to any order)."""

    @staticmethod
    def forward(ctx, x, ah, aw):
        ctx.save_for_backward(ah, aw)
        return _band(x, ah, aw)

    @staticmethod
    def backward(ctx, go):
        ah, aw = ctx.saved_tensors
        return Band.apply(go.contiguous(), ah.t().contiguous(), aw.t().contiguous()), None, None
