// out[b,c] = A_h @ x[b,c] @ A_w^T for small dense matrices that are banded (each row has a short
// run of non-zeros): a separable resize such as bicubic, with any padding folded into the rows.
// A dense matmul spends (input side) multiply-adds per output; this spends about the band width
// (4 for bicubic) per output and axis, in 64-byte vector registers (simd.h):
// - W pass (along rows): each block of L output columns is a small dense (span x L) product with
//   the block's own slice of A_w^T, kept as a vector per input column: R rows at once, so each
//   slice vector serves R independent FMA chains.
// - H pass (across rows): an output row is a combination of a few whole rows, FMAs over
//   contiguous vectors.
// Per plane the cheaper order runs (W first when upsampling: the W pass then sees the h input
// rows instead of the Ho output rows), through a per-thread buffer that stays in L2.
// The adjoint (A_h^T @ g @ A_w) is the same op on the transposed matrices.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "simd.h"

at::Tensor upfeat_pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opt);

namespace {

using upfeat_simd::Vec;
using upfeat_simd::vload;
using upfeat_simd::vstore;

// First and one-past-last non-zero column of every row of a (n, m) matrix (empty rows: 0, 0).
template <typename T>
void row_ranges(const T* a, int n, int m, std::vector<int>& lo, std::vector<int>& hi) {
  lo.assign(n, 0);
  hi.assign(n, 0);
  for (int i = 0; i < n; ++i) {
    int l = m, h = 0;
    for (int j = 0; j < m; ++j)
      if (a[(int64_t)i * m + j] != T(0)) { l = std::min(l, j); h = j + 1; }
    if (h > 0) { lo[i] = l; hi[i] = h; }
  }
}

// A_w^T cut in blocks of L output columns: block b reads input columns [base, base + span) and
// holds M[s] = A_w[b*L .. b*L+L, base + s] as one vector per s (zeros past Wo).
template <typename T>
struct WPlan {
  static constexpr int L = Vec<T>::L;
  int nb = 0, Wo = 0;
  std::vector<int> base, span;
  std::vector<int64_t> moff;
  std::vector<T> M;
  int64_t cost = 0;  // vector FMAs per row

  WPlan(const T* aw, int Wo_, int w) : Wo(Wo_) {
    std::vector<int> lo, hi;
    row_ranges(aw, Wo, w, lo, hi);
    nb = (Wo + L - 1) / L;
    base.assign(nb, 0); span.assign(nb, 0); moff.assign(nb + 1, 0);
    for (int b = 0; b < nb; ++b) {
      int l = w, r = 0;
      for (int J = b * L; J < std::min(Wo, (b + 1) * L); ++J)
        if (hi[J] > 0) { l = std::min(l, lo[J]); r = std::max(r, hi[J]); }
      base[b] = r > 0 ? l : 0;
      span[b] = r > 0 ? r - l : 0;
      moff[b + 1] = moff[b] + (int64_t)span[b] * L;
      cost += span[b];
    }
    M.assign(moff[nb], T(0));
    for (int b = 0; b < nb; ++b)
      for (int s = 0; s < span[b]; ++s)
        for (int j = 0; j < L && b * L + j < Wo; ++j)
          M[moff[b] + (int64_t)s * L + j] = aw[(int64_t)(b * L + j) * w + base[b] + s];
  }

  // R rows: dst[r] = src[r] @ A_w^T (src rows of width w, stride ss; dst stride ds).
  template <int R>
  void rows(const T* src, int64_t ss, T* dst, int64_t ds) const {
    using V = typename Vec<T>::type;
    for (int b = 0; b < nb; ++b) {
      V acc[R];
      for (int r = 0; r < R; ++r) acc[r] = V{};
      const T* m = M.data() + moff[b];
      const T* s0 = src + base[b];
      for (int s = 0; s < span[b]; ++s) {
        const V mv = vload<V>(m + (int64_t)s * L);
        for (int r = 0; r < R; ++r) acc[r] += s0[r * ss + s] * mv;
      }
      const int nv = std::min(L, Wo - b * L);
      for (int r = 0; r < R; ++r) {
        T* d = dst + r * ds + b * L;
        if (nv == L) {
          vstore(d, acc[r]);
        } else {
          T tmp[L];
          vstore(tmp, acc[r]);
          std::memcpy(d, tmp, sizeof(T) * nv);
        }
      }
    }
  }

  void apply(const T* src, int64_t ss, int n, T* dst, int64_t ds) const {
    constexpr int R = 4;  // rows per step: independent FMA chains hide the FMA latency
    int i = 0;
    for (; i + R <= n; i += R) rows<R>(src + i * ss, ss, dst + i * ds, ds);
    for (; i < n; ++i) rows<1>(src + i * ss, ss, dst + i * ds, ds);
  }
};

// dst row I = sum_{i in [lo[I], hi[I])} A_h[I, i] * src row i, rows of width `wid`.
template <typename T>
void h_pass(const T* ah, int ncol, const std::vector<int>& lo, const std::vector<int>& hi,
            const T* src, int64_t ss, int n_out, int wid, T* dst, int64_t ds) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L, NB = 4;
  for (int I = 0; I < n_out; ++I) {
    const T* a = ah + (int64_t)I * ncol;
    T* d = dst + I * ds;
    int j = 0;
    for (; j + NB * L <= wid; j += NB * L) {
      V acc[NB];
      for (int q = 0; q < NB; ++q) acc[q] = V{};
      for (int i = lo[I]; i < hi[I]; ++i) {
        const T c = a[i];
        const T* s = src + i * ss + j;
        for (int q = 0; q < NB; ++q) acc[q] += c * vload<V>(s + q * L);
      }
      for (int q = 0; q < NB; ++q) vstore(d + j + q * L, acc[q]);
    }
    for (; j + L <= wid; j += L) {
      V acc = V{};
      for (int i = lo[I]; i < hi[I]; ++i) acc += a[i] * vload<V>(src + i * ss + j);
      vstore(d + j, acc);
    }
    for (; j < wid; ++j) {
      T acc = T(0);
      for (int i = lo[I]; i < hi[I]; ++i) acc += a[i] * src[i * ss + j];
      d[j] = acc;
    }
  }
}

template <typename T>
void band_impl(const T* x, const T* ah, const T* aw, T* out, int64_t planes, int h, int w, int Ho,
               int Wo) {
  constexpr int L = Vec<T>::L;
  const WPlan<T> wp(aw, Wo, w);
  std::vector<int> hlo, hhi;
  row_ranges(ah, Ho, h, hlo, hhi);
  int64_t htaps = 0;
  for (int I = 0; I < Ho; ++I) htaps += hhi[I] - hlo[I];
  const int64_t cw = (int64_t)(w + L - 1) / L, cWo = (int64_t)(Wo + L - 1) / L;
  const bool w_first = h * wp.cost + htaps * cWo <= htaps * cw + Ho * wp.cost;
  const int64_t buf = w_first ? (int64_t)h * Wo : (int64_t)Ho * w;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    upfeat_simd::FlushDenormals ftz;
    std::vector<T> tmp((size_t)std::max<int64_t>(buf, 1));
    for (int64_t p = begin; p < end; ++p) {
      const T* xp = x + p * h * w;
      T* op = out + p * Ho * Wo;
      if (w_first) {
        wp.apply(xp, w, h, tmp.data(), Wo);
        h_pass(ah, h, hlo, hhi, tmp.data(), Wo, Ho, Wo, op, Wo);
      } else {
        h_pass(ah, h, hlo, hhi, xp, w, Ho, w, tmp.data(), w);
        wp.apply(tmp.data(), w, Ho, op, Wo);
      }
    }
  });
}

}  // namespace

// x (B,C,h,w), ah (Ho,h), aw (Wo,w) -> (B,C,Ho,Wo) = ah @ x @ aw^T
at::Tensor band_matmul(const at::Tensor& x, const at::Tensor& ah, const at::Tensor& aw) {
  for (const auto* t : {&x, &ah, &aw}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "band_matmul: CPU contiguous tensors only");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "band_matmul: x, ah, aw must share a dtype");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "band_matmul: float32 or float64 only");
  TORCH_CHECK(x.dim() == 4 && ah.dim() == 2 && aw.dim() == 2, "band_matmul: x must be 4-D and ah, "
              "aw 2-D, got ", x.sizes(), ", ", ah.sizes(), ", ", aw.sizes());
  TORCH_CHECK(ah.size(1) == x.size(2) && aw.size(1) == x.size(3), "band_matmul: ah ", ah.sizes(),
              " and aw ", aw.sizes(), " do not fit x ", x.sizes(), " (need ah (Ho, h), aw (Wo, w))");
  const int64_t B = x.size(0), C = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t Ho = ah.size(0), Wo = aw.size(0);
  auto out = upfeat_pooled_empty({B, C, Ho, Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "band_matmul", [&] {
    band_impl<scalar_t>(x.data_ptr<scalar_t>(), ah.data_ptr<scalar_t>(), aw.data_ptr<scalar_t>(),
                        out.data_ptr<scalar_t>(), B * C, h, w, Ho, Wo);
  });
  return out;
}
