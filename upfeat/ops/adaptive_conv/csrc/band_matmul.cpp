// out[b,c] = A_h @ x[b,c] @ A_w^T for small dense matrices that are banded (each row has a short
// run of non-zeros): a separable resize such as bicubic, with any padding folded into the rows.
// A dense matmul spends (input side) multiply-adds per output; this spends the band width (4 for
// bicubic): one pass along columns (vectorised over the row), then one along rows, where each
// block of VB output columns is a small dense (span x VB) product with the block's own band.
// The adjoint (A_h^T @ g @ A_w) is the same op on the transposed matrices.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

at::Tensor upfeat_pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opt);

namespace {

constexpr int VB = 16;  // output columns per block of the row pass

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

template <typename T>
void band_impl(const T* x, const T* ah, const T* aw, T* out, int64_t planes, int h, int w, int Ho,
               int Wo) {
  std::vector<int> hlo, hhi, wlo, whi;
  row_ranges(ah, Ho, h, hlo, hhi);
  row_ranges(aw, Wo, w, wlo, whi);
  // Row pass blocks: columns [J0, J0+VB) read x columns [base, base+span); M is span x VB.
  const int nb = (Wo + VB - 1) / VB;
  std::vector<int> base(nb), span(nb);
  std::vector<int64_t> moff(nb + 1, 0);
  for (int b = 0; b < nb; ++b) {
    int l = w, r = 0;
    for (int J = b * VB; J < std::min(Wo, (b + 1) * VB); ++J)
      if (whi[J] > 0) { l = std::min(l, wlo[J]); r = std::max(r, whi[J]); }
    base[b] = r > 0 ? l : 0;
    span[b] = r > 0 ? r - l : 0;
    moff[b + 1] = moff[b] + (int64_t)span[b] * VB;
  }
  std::vector<T> M(moff[nb], T(0));
  for (int b = 0; b < nb; ++b)
    for (int s = 0; s < span[b]; ++s)
      for (int j = 0; j < VB && b * VB + j < Wo; ++j)
        M[moff[b] + (int64_t)s * VB + j] = aw[(int64_t)(b * VB + j) * w + base[b] + s];
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tmp((size_t)w);
    for (int64_t p = begin; p < end; ++p) {
      const T* xp = x + p * h * w;
      T* op = out + p * Ho * Wo;
      for (int I = 0; I < Ho; ++I) {
        std::fill(tmp.begin(), tmp.end(), T(0));
        for (int i = hlo[I]; i < hhi[I]; ++i) {  // column pass: one output row, vectorised
          const T a = ah[(int64_t)I * h + i];
          const T* xr = xp + (int64_t)i * w;
          for (int j = 0; j < w; ++j) tmp[j] += a * xr[j];
        }
        T* orow = op + (int64_t)I * Wo;
        for (int b = 0; b < nb; ++b) {  // row pass: acc[VB] += tmp[base+s] * M[s, :]
          T acc[VB] = {};
          const T* mb = M.data() + moff[b];
          const T* tb = tmp.data() + base[b];
          for (int s = 0; s < span[b]; ++s) {
            const T t = tb[s];
            for (int j = 0; j < VB; ++j) acc[j] += t * mb[s * VB + j];
          }
          std::memcpy(orow + b * VB, acc, sizeof(T) * std::min(VB, Wo - b * VB));
        }
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
