// The JBU kernel's normalisation in one pass, in place, on tap-major logits (B, K2, H, W):
//   w[b,t,p] = softmax_t(l[b,t,p] + ls[t]),  then w = 0 where w < thr.
// In torch that is five passes over the (B, K2, H, W) tensor (add, max, exp-sum, divide,
// compare-and-fill); here a tile of 64 pixels x K2 taps (12.5 KB at k = 7) stays in L1 while
// the three sweeps of the softmax run over it, so the tensor is read and written once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

using upfeat_simd::vfloat;
using upfeat_simd::vload;
using upfeat_simd::vstore;
typedef int32_t vint __attribute__((vector_size(64)));
constexpr int L = 16, NVS = 4, JB = NVS * L;  // 64 pixels per tile

// exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp). Below
// -87 the result is clamped to exp(-87) ~ 1.6e-38, which the threshold zeroes anyway.
inline vfloat vexp(vfloat x) {
  x = x < -87.0f ? vfloat{} - 87.0f : x;
  const vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat s;
  std::memcpy(&s, &e, sizeof(s));
  return p * s;
}

// One tile: rows t of `l` at l + t * ld, NVS vectors each.
inline void tile(float* l, int64_t ld, int K2, const float* ls, float thr) {
  vfloat m[NVS], s[NVS];
  for (int n = 0; n < NVS; ++n) m[n] = vload<vfloat>(l + n * L) + ls[0];
  for (int t = 1; t < K2; ++t)
    for (int n = 0; n < NVS; ++n) {
      const vfloat x = vload<vfloat>(l + t * ld + n * L) + ls[t];
      m[n] = x > m[n] ? x : m[n];
    }
  for (int n = 0; n < NVS; ++n) s[n] = vfloat{};
  for (int t = 0; t < K2; ++t)
    for (int n = 0; n < NVS; ++n) {
      const vfloat e = vexp(vload<vfloat>(l + t * ld + n * L) + ls[t] - m[n]);
      s[n] += e;
      vstore(l + t * ld + n * L, e);
    }
  for (int n = 0; n < NVS; ++n) s[n] = 1.0f / s[n];
  for (int t = 0; t < K2; ++t)
    for (int n = 0; n < NVS; ++n) {
      const vfloat w = vload<vfloat>(l + t * ld + n * L) * s[n];
      vstore(l + t * ld + n * L, w < thr ? vfloat{} : w);
    }
}

}  // namespace

// logits (B, K2, H, W) float32 contiguous, modified in place; log_s (K2,).
void tap_softmax_(at::Tensor& logits, const at::Tensor& log_s, double thr) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.is_contiguous()
                  && logits.dim() == 4, "logits must be a contiguous 4-D float32 CPU tensor");
  const int64_t B = logits.size(0), K2 = logits.size(1), HW = logits.size(2) * logits.size(3);
  TORCH_CHECK(log_s.dim() == 1 && log_s.size(0) == K2 && log_s.scalar_type() == at::kFloat,
              "log_s must be a float32 vector of ", K2, " taps");
  const at::Tensor lsc = log_s.contiguous();
  const float* ls = lsc.data_ptr<float>();
  float* base = logits.data_ptr<float>();
  const float th = (float)thr;
  const int64_t nt = (HW + JB - 1) / JB;
  at::parallel_for(0, B * nt, 16, [&](int64_t begin, int64_t end) {
    upfeat_simd::FlushDenormals ftz;
    std::vector<float> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nt, p0 = (task % nt) * JB, nvalid = std::min<int64_t>(JB, HW - p0);
      float* l = base + b * K2 * HW + p0;
      if (nvalid == JB) {
        tile(l, HW, (int)K2, ls, th);
        continue;
      }
      // last partial tile: through a local copy (the padding columns compute garbage-free zeros)
      buf.assign((size_t)K2 * JB, 0.0f);
      for (int64_t t = 0; t < K2; ++t) std::memcpy(&buf[t * JB], l + t * HW, sizeof(float) * nvalid);
      tile(buf.data(), JB, (int)K2, ls, th);
      for (int64_t t = 0; t < K2; ++t) std::memcpy(l + t * HW, &buf[t * JB], sizeof(float) * nvalid);
    }
  });
}
