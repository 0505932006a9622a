// Fast CPU kernels for the adaptive (per-pixel) convolution and its adjoints.
//
// Three linear maps close the op under differentiation (weights in tap-major layout):
//   fwd : out[b,c,i,j]  = sum_t feat[b,c,i+u,j+v] * w[b,t,i,j]        (B,C,Hp,Wp),(B,K2,H,W) -> (B,C,H,W)
//   tr  : gf[b,c,y,x]   = sum_t g[b,c,y-u,x-v]    * w[b,t,y-u,x-v]    (B,C,H,W),(B,K2,H,W)  -> (B,C,Hp,Wp)
//   corr: gw[b,t,i,j]   = sum_c a[b,c,i,j]        * p[b,c,i+u,j+v]    (B,C,H,W),(B,C,Hp,Wp) -> (B,K2,H,W)
// with t = u*k + v, Hp = H+k-1, Wp = W+k-1; out-of-range terms of `tr` are zero.
// Nothing of size C*k*k*H*W is ever materialised: each kernel keeps a tile of outputs in vector
// registers (GCC/Clang vector extensions, 64-byte vectors -> AVX-512 when -march=native has it)
// and streams the inputs once per tap. Edge tiles are copied into small zero-padded local buffers
// so one register kernel serves both interior and borders. At 224² and more the inputs come from
// L3 or memory with strides the hardware prefetchers do not follow (channels H*W apart): each
// kernel prefetches the next block's rows while it computes (1.5x for fwd and corr).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>

#include <algorithm>
#include <cstring>
#include <vector>
#include <type_traits>

#include "simd.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using upfeat_simd::Vec;
using upfeat_simd::vload;
using upfeat_simd::vstore;


// Large fresh outputs are expensive here: the kernel zeroes every new page on first touch
// (~12 ms for the 77 MB output at 224², 40% of the forward). Big outputs therefore come from a
// small pool of freed blocks (exact byte size, 2 MB aligned, transparent huge pages), like the
// CUDA caching allocator. At most `cap` bytes are kept; `empty_cache()` returns them to the OS.
class Pool {
 public:
  static Pool& get() { static Pool* p = new Pool(); return *p; }  // leaked: outlives tensors at exit
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, size_t(2) << 20, bytes) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
  }
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    if (cached_ + bytes > cap_) { std::free(p); return; }
    free_.emplace(bytes, p);
    cached_ += bytes;
  }
  size_t empty() {
    std::lock_guard<std::mutex> g(mu_);
    size_t n = cached_;
    for (auto& kv : free_) std::free(kv.second);
    free_.clear();
    cached_ = 0;
    return n;
  }
  size_t cached() { std::lock_guard<std::mutex> g(mu_); return cached_; }
  void set_cap(size_t c) { std::lock_guard<std::mutex> g(mu_); cap_ = c; }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, cap_ = size_t(1) << 30;
};

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  const size_t bytes = std::max<size_t>(1, n * opt.dtype().itemsize());
  if (bytes < (size_t(4) << 20)) return at::empty(sizes, opt);
  void* p = Pool::get().take(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { Pool::get().give(q, bytes); }, opt);
}

// A store that bypasses the caches (p 64-byte aligned): for outputs written once and not read
// back soon, it saves reading each line in before it is overwritten.
template <typename T, typename V>
inline void vstream(T* p, const V& v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && std::is_same_v<T, float>) { _mm512_stream_ps(p, (__m512)v); return; }
  if constexpr (sizeof(V) == 64 && std::is_same_v<T, double>) { _mm512_stream_pd(p, (__m512d)v); return; }
#endif
  vstore(p, v);
}

// For std::vector: storage on 64-byte boundaries (aligned vector loads and stores).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U> Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, std::max<size_t>(1, n * sizeof(T))) != 0) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U> bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U> bool operator!=(const Aligned64<U>&) const { return false; }
};

// Streaming stores are weakly ordered: a worker fences them before handing its chunk back, so the
// thread that joins the parallel region (and any later reader) sees the data.
inline void stream_fence(bool streamed) {
#if defined(__AVX512F__)
  if (streamed) _mm_sfence();
#else
  (void)streamed;
#endif
}

// Lanes [lo, hi) of the vector at p (only those are read), zeros elsewhere; 0 <= lo, hi <= L.
template <typename T>
inline typename Vec<T>::type vload_part(const T* p, int lo, int hi) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  if (lo >= hi) return V{};
  if (lo == 0 && hi == L) return vload<V>(p);
#if defined(__AVX512F__)
  const unsigned m = ((1u << hi) - 1) & ~((1u << lo) - 1);
  if constexpr (std::is_same_v<T, float>) return (V)_mm512_maskz_loadu_ps((__mmask16)m, p);
  if constexpr (std::is_same_v<T, double>) return (V)_mm512_maskz_loadu_pd((__mmask8)m, p);
#endif
  T tmp[L] = {};
  std::memcpy(tmp + lo, p + lo, sizeof(T) * (hi - lo));
  return vload<V>(tmp);
}

// dst[n] = src[n] for n in [lo, hi), 0 for the other n in [0, len); len a multiple of L.
template <typename T>
inline void copy_part(T* dst, const T* src, int lo, int hi, int len) {
  constexpr int L = Vec<T>::L;
  for (int n = 0; n < len; n += L)
    vstore(dst + n, vload_part(src + n, std::max(lo - n, 0), std::min(std::max(hi - n, 0), L)));
}

// f(std::integral_constant<int, I>{}) for the one I < N equal to idx.
template <int N, typename F>
inline __attribute__((always_inline)) void dispatch(int idx, F&& f) {
  if constexpr (N > 0) {
    if (idx == N - 1) f(std::integral_constant<int, N - 1>{});
    else dispatch<N - 1>(idx, f);
  }
}

// Where a register tile's output vectors go: vector (r, c) to o + c*oc + r*orow, its first nvalid
// lanes. Rows that start mid cache line (tr's, Wp floats apart) can keep `carry` (L values per
// row and channel, c*carry_c + r*L): each vector is then split at the line boundary, the part
// completing the line begun by the previous column tile (first: none) is stored as a whole line
// (streamed), and the rest waits in carry for the next tile, or is stored now (last). An
// unaligned 64-byte store can be neither streamed nor kept within one line: tr's 81 MB output at
// 224² then costs a read of every line before it is written (3-4 ms of tr's ~26).
template <typename T>
struct Sink {
  T* o;
  int64_t oc, orow;
  int nvalid;
  bool stream;
  T* carry = nullptr;
  int64_t carry_c = 0;
  bool first = false, last = false;

  Sink at(int r, int c) const {
    Sink s = *this;
    s.o += c * oc + r * orow;
    if (carry) s.carry += c * carry_c + r * Vec<T>::L;
    return s;
  }

  void put(int r, int c, const typename Vec<T>::type& v) const {
    constexpr int L = Vec<T>::L;
    T* op = o + c * oc + r * orow;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      if (carry) { put_split(op, (__m512)v, carry + c * carry_c + r * L); return; }
    }
#endif
    if (nvalid == L) {
      if (stream && ((uintptr_t)op & 63) == 0) vstream(op, v); else vstore(op, v);
    } else {
      T tmp[L];
      vstore(tmp, v);
      std::memcpy(op, tmp, sizeof(T) * nvalid);
    }
  }

#if defined(__AVX512F__)
  void put_split(float* op, __m512 v, float* cp) const {
    const int m = ((uintptr_t)op & 63) >> 2;  // lanes of op's line before op
    float* line = op - m;
    // rows starting on a line need no split; a row not on a float boundary cannot be split
    if (((uintptr_t)op & 3) != 0 || m == 0) {
      if (nvalid == 16) {
        if (stream && m == 0) _mm512_stream_ps(op, v); else _mm512_storeu_ps(op, v);
      } else {
        _mm512_mask_storeu_ps(op, (__mmask16)((1u << nvalid) - 1), v);
      }
      return;
    }
    // rot: lane n holds v[(n - m) mod 16], so lanes >= m continue this line and lanes < m
    // begin the next one
    const __m512i idx = _mm512_sub_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(m));
    const __m512 rot = _mm512_permutexvar_ps(idx, v);
    const __mmask16 head = (__mmask16)((1u << m) - 1);
    const __m512 a = _mm512_mask_blend_ps(head, rot, _mm512_load_ps(cp));
    const int hi = std::min(16, m + nvalid);
    if (!first && hi == 16) {
      if (stream) _mm512_stream_ps(line, a); else _mm512_store_ps(line, a);
    } else {
      _mm512_mask_storeu_ps(line, (__mmask16)(((1u << hi) - 1) & ~(first ? head : 0u)), a);
    }
    const int rest = nvalid - (16 - m);  // lanes of v past this line
    if (rest <= 0) return;
    if (last) _mm512_mask_storeu_ps(line + 16, (__mmask16)((1u << rest) - 1), rot);
    else _mm512_store_ps(cp, rot);
  }
#endif
};

// R output rows x C_B channels x one vector (L columns): R*C_B accumulators (24 of the 32
// registers for 4 x 6), so each feat vector load feeds up to R FMAs and each weight vector C_B:
// (R + C_B) loads per R*C_B FMAs (the previous 2-row x 4-channel x 2-vector tile: 6 per 8). Feat row
// s feeds output row r through tap row u = s - r, for r in [max(0, s-k+1), min(R-1, s)]: that
// range is a compile-time constant of each step (dispatch), so no FMA multiplies a zero weight.
// w: packed weights, tap t of row r at w + t*wt + r*L.
// KC: k as a compile-time constant (0: use k_), for the common k = 7 (the JBU's): every loop is
// then unrolled and scheduled as one block, 3-5 % faster for fwd and tr.
template <typename T, int C_B, int R, int KC = 0>
inline void fwd_tile(const T* f, int64_t fc, int64_t fr, const T* w, int64_t wt, int k_, const Sink<T>& out,
                     const T* fnext = nullptr, int64_t nfc = 0, int64_t nfr = 0) {
  const int k = KC ? KC : k_;
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  V acc[R][C_B];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C_B; ++c) acc[r][c] = V{};
  // fnext: the next call's features, prefetched one row behind this call's (rows at a distance
  // of a multiple of 4 KB share an L1 set: the lag leaves this call's current row alone)
  constexpr int LAG = 1;
  if (nfc == 0) nfc = fc, nfr = fr;  // (default: fnext laid out like f)
  for (int s = 0; s < R + k - 1; ++s) {
    const int rlo = std::max(0, s - k + 1), rhi = std::min(R - 1, s);
    if (fnext && s >= LAG)
      for (int c = 0; c < C_B; ++c) {
        __builtin_prefetch(fnext + c * nfc + (s - LAG) * nfr);
        __builtin_prefetch(fnext + c * nfc + (s - LAG) * nfr + L + k - 2);
      }
    dispatch<R * R>(rlo * R + rhi, [&](auto id) __attribute__((always_inline)) {
      constexpr int RLO = decltype(id)::value / R, RHI = decltype(id)::value % R;
      if constexpr (RLO <= RHI) {
        const T* fp = f + s * fr;
        for (int v = 0; v < k; ++v) {
          V wv[R];
          for (int r = RLO; r <= RHI; ++r) wv[r] = vload<V>(w + ((int64_t)(s - r) * k + v) * wt + r * L);
          for (int c = 0; c < C_B; ++c) {
            V fv = vload<V>(fp + c * fc + v);
            // One load per vector: without this GCC folds the load into each row's FMA (R loads,
            // most split over two cache lines), which the load ports cannot sustain.
            if constexpr (RHI > RLO) asm("" : "+v"(fv));
            for (int r = RLO; r <= RHI; ++r) acc[r][c] += fv * wv[r];
          }
        }
      }
    });
  }
  if (fnext)
    for (int s = std::max(0, R + k - 1 - LAG); s < R + k - 1; ++s)
      for (int c = 0; c < C_B; ++c) {
        __builtin_prefetch(fnext + c * nfc + s * nfr);
        __builtin_prefetch(fnext + c * nfc + s * nfr + L + k - 2);
      }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C_B; ++c) out.put(r, c, acc[r][c]);
}

// One tile of nr <= R rows and cb <= C_B channels: the full R x C_B register tile where it fits
// (prefetching fnext, laid out with strides nfc/nfr), single rows / channels at the edges.
template <typename T, int C_B, int R>
inline void fwd_block(const T* f, int64_t fc, int64_t fr, const T* w, int64_t wt, int k, const Sink<T>& out,
                      int nr, int cb, const T* fnext, int64_t nfc = 0, int64_t nfr = 0) {
  constexpr int L = Vec<T>::L;
  if (nr == R && cb == C_B) {
    if (k == 7) fwd_tile<T, C_B, R, 7>(f, fc, fr, w, wt, k, out, fnext, nfc, nfr);
    else fwd_tile<T, C_B, R>(f, fc, fr, w, wt, k, out, fnext, nfc, nfr);
  } else if (nr == R) {
    for (int c = 0; c < cb; ++c) fwd_tile<T, 1, R>(f + c * fc, fc, fr, w, wt, k, out.at(0, c));
  } else {
    for (int r = 0; r < nr; ++r) {
      if (cb == C_B) {
        fwd_tile<T, C_B, 1>(f + r * fr, fc, fr, w + r * L, wt, k, out.at(r, 0));
      } else {
        for (int c = 0; c < cb; ++c) fwd_tile<T, 1, 1>(f + c * fc + r * fr, fc, fr, w + r * L, wt, k, out.at(r, c));
      }
    }
  }
}

// corr, R output rows x V_B taps (v0 .. v0+V_B-1 of one tap row each) x one vector of columns:
// feat row s feeds row r through tap row u = s - r (r in a compile-time range per s, as in
// fwd_tile), so each p vector load serves up to R FMAs and each a vector V_B: (R + V_B) loads
// per R*V_B FMAs (10 per 21 for 3 x 7, against 9 per 14 for the previous 2 x 7).
// al: the tile's a, packed (channel c, row r at al + c*as + r*L); p: feat row 0, column v0 of
// channel 0 (channel c, row s at p + c*pc + s*pr); o: output row 0, tap (0, v0) (tap t at
// o + t*ot, row r at + r*orow). accumulate: add to o instead of overwriting it. an: the next
// tile's a in place (channel c, row s at an + c*anc + s*anr; an_rows x an_ch of them), which its
// packing will read from memory: prefetched into L2 meanwhile (in place its channels share an L1
// set, so into L1 they would evict each other).
template <typename T, int R, int V_B>
inline void corr_tile(const T* al, int64_t as, const T* p, int64_t pc, int64_t pr, int C, int k, T* o,
                      int64_t ot, int64_t orow, int nvalid, bool accumulate, const T* an = nullptr,
                      int64_t anc = 0, int64_t anr = 0, int an_rows = 0, int an_ch = 0) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  for (int s = 0; s < R + k - 1; ++s) {
    const int rlo = std::max(0, s - k + 1), rhi = std::min(R - 1, s);
    dispatch<R * R>(rlo * R + rhi, [&](auto id) __attribute__((always_inline)) {
      constexpr int RLO = decltype(id)::value / R, RHI = decltype(id)::value % R;
      if constexpr (RLO <= RHI) {
        V acc[R][V_B];
        for (int r = RLO; r <= RHI; ++r)
          for (int v = 0; v < V_B; ++v)
            acc[r][v] = accumulate ? vload_part(o + (int64_t)(s - r) * k * ot + v * ot + r * orow, 0, nvalid) : V{};
        const T* pp = p + s * pr;
        constexpr int PD = 6;  // channels ahead: p rows come from L2 or farther, strided
        for (int c = 0; c < C; ++c) {
          if (c + PD < C) {
            __builtin_prefetch(pp + (c + PD) * pc);
            __builtin_prefetch(pp + (c + PD) * pc + L + V_B - 2);
          }
          if (an && s < an_rows && c < an_ch) __builtin_prefetch(an + c * anc + s * anr, 0, 2);
          V x[R];
          for (int r = RLO; r <= RHI; ++r) x[r] = vload<V>(al + c * as + r * L);
          for (int v = 0; v < V_B; ++v) {
            V pv = vload<V>(pp + c * pc + v);
            if constexpr (RHI > RLO) asm("" : "+v"(pv));  // one load for all rows (see fwd_tile)
            for (int r = RLO; r <= RHI; ++r) acc[r][v] += x[r] * pv;
          }
        }
        for (int r = RLO; r <= RHI; ++r)
          for (int v = 0; v < V_B; ++v) {
            T* op = o + (int64_t)(s - r) * k * ot + v * ot + r * orow;
            if (nvalid == L) {
              vstore(op, acc[r][v]);
            } else {
              T tmp[L];
              vstore(tmp, acc[r][v]);
              std::memcpy(op, tmp, sizeof(T) * nvalid);
            }
          }
      }
    });
  }
}

template <typename T, int R>
void corr_taps(const T* al, int64_t as, const T* p, int64_t pc, int64_t pr, int C, int k, T* o,
               int64_t ot, int64_t orow, int nvalid, bool acc, const T* an = nullptr,
               int64_t anc = 0, int64_t anr = 0, int an_rows = 0, int an_ch = 0) {
  int v0 = 0;
  for (; v0 + 7 <= k; v0 += 7, an = nullptr)  // (the next tile's a: prefetched once)
    corr_tile<T, R, 7>(al, as, p + v0, pc, pr, C, k, o + v0 * ot, ot, orow, nvalid, acc, an, anc, anr, an_rows, an_ch);
  for (; v0 + 3 <= k; v0 += 3) corr_tile<T, R, 3>(al, as, p + v0, pc, pr, C, k, o + v0 * ot, ot, orow, nvalid, acc);
  for (; v0 < k; ++v0) corr_tile<T, R, 1>(al, as, p + v0, pc, pr, C, k, o + v0 * ot, ot, orow, nvalid, acc);
}

// ---------------------------------------------------------------------------------------------
// (B,H,W,K2) -> (B,K2,H,W): one image row (W x K2 values, in L1) per step.
template <typename T>
void hwk_to_tap(const T* src, T* dst, int B, int H, int W, int K2) {
  at::parallel_for(0, (int64_t)B * H, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, i = r % H;
      const T* s = src + r * W * K2;
      T* d0 = dst + (b * K2 * H + i) * W;
      // 16-pixel column blocks: the source block (16 x K2) stays in L1 across the K2 passes,
      // and each pass writes whole destination cache lines (the unblocked loop ran each pass
      // over the whole row, W x K2 values, which does not fit L1 alongside the writes).
      for (int j0 = 0; j0 < W; j0 += 16) {
        const int jn = std::min(16, W - j0);
        const T* sb = s + (int64_t)j0 * K2;
        for (int t = 0; t < K2; ++t) {
          T* d = d0 + (int64_t)t * H * W + j0;
          for (int j = 0; j < jn; ++j) d[j] = sb[(int64_t)j * K2 + t];
        }
      }
    }
  });
}

template <typename T>
void fwd_impl(const T* feat, const T* w, T* out, int64_t osb, int B, int C, int H, int W, int k) {
  constexpr int L = Vec<T>::L;
  constexpr int FR = 4, FC = 6;  // rows, channels of fwd_tile's register tile
  const int Hp = H + k - 1, Wp = W + k - 1, K2 = k * k;
  const int64_t HW = (int64_t)H * W, HWp = (int64_t)Hp * Wp;
  const int IT = 16;  // rows per task
  const int CG = 96;  // channels per task
  // outputs much larger than the caches are streamed past them (vstream)
  const bool stream = (int64_t)B * C * HW * sizeof(T) > (int64_t(32) << 20);
  const int nit = (H + IT - 1) / IT, ncg = (C + CG - 1) / CG;
  at::parallel_for(0, (int64_t)B * nit * ncg, 1, [&](int64_t begin, int64_t end) {
    upfeat_simd::FlushDenormals ftz;
    const int span = (L + k - 1 + L - 1) / L * L;  // a border tile's local feature rows
    std::vector<T> fl((size_t)FC * (FR + k - 1) * span, T(0)), wl((size_t)K2 * FR * L);
    for (int64_t task = begin; task < end; ++task) {
      const int b = task / (nit * ncg), it = (task / ncg) % nit, cg = task % ncg;
      const int c_end = std::min(C, (cg + 1) * CG), i_end = std::min(H, (it + 1) * IT);
      const T* wb = w + (int64_t)b * K2 * HW;
      const int ni = (i_end - it * IT + FR - 1) / FR, nj = (W + L - 1) / L;
      for (int q = 0; q < ni * nj; ++q) {
        const int i = it * IT + FR * (q / nj), j0 = L * (q % nj);
        const int nr = std::min(FR, i_end - i);
        const int nvalid = std::min(L, W - j0);
        // The tile's weights, packed (K2 x FR x L, zero-padded) and reused by every channel:
        // read in place, the K2 tap rows lie H*W floats apart, a multiple of 4 KB for sizes
        // like 224² and 448², so all of them fall in one L1 set and evict each other.
        const T* wp = wb + (int64_t)i * W + j0;
        for (int t = 0; t < K2; ++t)
          for (int r = 0; r < FR; ++r)
            copy_part(&wl[((size_t)t * FR + r) * L], wp + t * HW + (int64_t)r * W, 0, r < nr ? nvalid : 0, L);
        const T* wt_ = wl.data();
        const int64_t wt = (int64_t)FR * L;
        // the next tile (prefetched meanwhile): its weight rows, a few per channel block, for
        // its packing; its features during the last channel block
        const bool next = q + 1 < ni * nj;
        const int i2 = it * IT + FR * ((q + 1) / nj), j2 = L * ((q + 1) % nj);
        const T* wn = next && i2 + FR <= H ? wb + (int64_t)i2 * W + j2 : nullptr;
        const int nblk = (c_end - cg * CG + FC - 1) / FC, per = (K2 * FR + nblk - 1) / nblk;
        for (int c0 = cg * CG; c0 < c_end; c0 += FC) {
          const int cb = std::min(FC, c_end - c0);
          if (wn) {
            const int m = (c0 - cg * CG) / FC;
            for (int x = m * per; x < std::min(K2 * FR, (m + 1) * per); ++x)
              __builtin_prefetch(wn + (x / FR) * HW + (int64_t)(x % FR) * W);
          }
          T* o = out + (int64_t)b * osb + (int64_t)c0 * HW + (int64_t)i * W + j0;  // osb: batch stride
          const T* f = feat + ((int64_t)b * C + c0) * HWp + (int64_t)i * Wp + j0;
          int64_t fc = HWp, fr = Wp;
          if (nvalid < L) {  // border tile: zero-padded local copy of the features
            const int ns = nr + k - 1;
            for (int c = 0; c < cb; ++c)
              for (int r = 0; r < ns; ++r)
                copy_part(&fl[((size_t)c * (FR + k - 1) + r) * span], f + c * HWp + (int64_t)r * Wp, 0,
                          nvalid + k - 1, span);
            f = fl.data(); fc = (int64_t)(FR + k - 1) * span; fr = span;
          }
          // the next channel block's features, or the next tile's after the last block
          const T* fn = c0 + 2 * FC <= c_end ? (fc == HWp ? f + FC * fc : nullptr)
                        : next ? feat + ((int64_t)b * C + cg * CG) * HWp + (int64_t)i2 * Wp + j2 : nullptr;
          fwd_block<T, FC, FR>(f, fc, fr, wt_, wt, k, Sink<T>{o, HW, W, nvalid, stream}, nr, cb, fn);
        }
      }
    }
    stream_fence(stream);
  });
}

template <typename T>
void tr_impl(const T* g, const T* w, T* gf, int B, int C, int H, int W, int k) {
  // The forward's register tile on flipped taps: with u' = k-1-u, v' = k-1-v,
  //   gf[c, y, x] = sum_{u',v'} g[c, y-(k-1)+u', x-(k-1)+v'] * w[u, v, y-(k-1)+u', x-(k-1)+v'],
  // the forward's sum over a feature window at (y-(k-1), x-(k-1)) with per-output weights that
  // are the original weights shifted by (u', v') (zero outside the image): packed per tile.
  constexpr int L = Vec<T>::L;
  constexpr int FR = 4, FC = 6;  // fwd_tile's register tile (5 x 4 measured 7 % slower)
  const int Hp = H + k - 1, Wp = W + k - 1, K2 = k * k;
  const int64_t HW = (int64_t)H * W, HWp = (int64_t)Hp * Wp;
  const bool stream = (int64_t)B * C * HWp * sizeof(T) > (int64_t(32) << 20);
  const int IT = 16, CG = 96;
  const int nit = (Hp + IT - 1) / IT, ncg = (C + CG - 1) / CG;
  at::parallel_for(0, (int64_t)B * nit * ncg, 1, [&](int64_t begin, int64_t end) {
    upfeat_simd::FlushDenormals ftz;
    const int span = (L + k - 1 + L - 1) / L * L;  // a border tile's local feature rows
    std::vector<T> fl((size_t)FC * (FR + k - 1) * span, T(0)), wl((size_t)K2 * FR * L);
    // the unfinished cache line of each output row (Sink::carry), 64-byte aligned
    std::vector<T, Aligned64<T>> carry((size_t)CG * FR * L);
    for (int64_t task = begin; task < end; ++task) {
      const int b = task / (nit * ncg), it = (task / ncg) % nit, cg = task % ncg;
      const int c_end = std::min(C, (cg + 1) * CG), y_end = std::min(Hp, (it + 1) * IT);
      const T* wb = w + (int64_t)b * K2 * HW;
      const int ni = (y_end - it * IT + FR - 1) / FR, nj = (Wp + L - 1) / L;
      for (int q = 0; q < ni * nj; ++q) {
        const int y0 = it * IT + FR * (q / nj), x0 = L * (q % nj);
        const int nr = std::min(FR, y_end - y0), nvalid = std::min(L, Wp - x0);
        const int i0 = y0 - (k - 1), j0 = x0 - (k - 1);  // the feature window's corner in g
        // packed weights: tap t' = u'*k + v' of output row r at wl[(t'*FR + r)*L + n]
        for (int up = 0; up < k; ++up)
          for (int r = 0; r < FR; ++r) {
            const int i = i0 + r + up;
            const bool ok = r < nr && i >= 0 && i < H;
            for (int vp = 0; vp < k; ++vp) {
              const int c0 = j0 + vp;  // g / weight column of lane 0
              const T* src = wb + (int64_t)((k - 1 - up) * k + (k - 1 - vp)) * HW + (int64_t)i * W + c0;
              copy_part(&wl[((size_t)(up * k + vp) * FR + r) * L], src, ok ? std::max(0, -c0) : 0,
                        ok ? std::min(L, W - c0) : 0, L);
            }
          }
        const T* wt_ = wl.data();
        const int64_t wt = (int64_t)FR * L;
        const bool inside = i0 >= 0 && i0 + nr + k - 1 <= H && j0 >= 0 && j0 + L + k - 1 <= W;
        // the next tile's weight rows, a few per channel block (prefetched for its packing)
        const int nblk = (c_end - cg * CG + FC - 1) / FC, per = (K2 * FR + nblk - 1) / nblk;
        const bool pf = q + 1 < ni * nj;
        const int i0n = it * IT + FR * ((q + 1) / nj) - (k - 1), j0n = L * ((q + 1) % nj) - (k - 1);
        for (int c0 = cg * CG; c0 < c_end; c0 += FC) {
          const int cb = std::min(FC, c_end - c0);
          if (pf) {
            const int m = (c0 - cg * CG) / FC;
            for (int x = m * per; x < std::min(K2 * FR, (m + 1) * per); ++x) {
              const int up = x / FR / k, vp = x / FR % k, i = i0n + x % FR + up;
              if (i < 0 || i >= H) continue;
              const T* src = wb + (int64_t)((k - 1 - up) * k + (k - 1 - vp)) * HW + (int64_t)i * W + j0n + vp;
              __builtin_prefetch(src);
              __builtin_prefetch(src + L - 1);
            }
          }
          T* o = gf + ((int64_t)b * C + c0) * HWp + (int64_t)y0 * Wp + x0;
          const T* gb = g + ((int64_t)b * C + c0) * HW;
          const T* f;
          int64_t fc, fr;
          if (inside) {
            f = gb + (int64_t)i0 * W + j0; fc = HW; fr = W;
          } else {  // border tile: zero-padded local copy of the window
            const int clo = std::max(0, -j0), chi = std::min(L + k - 1, W - j0);
            for (int c = 0; c < cb; ++c)
              for (int s = 0; s < nr + k - 1; ++s) {
                const int i = i0 + s;
                const bool ok = i >= 0 && i < H;
                copy_part(&fl[((size_t)c * (FR + k - 1) + s) * span], gb + c * HW + (int64_t)i * W + j0,
                          ok ? clo : 0, ok ? chi : 0, span);
              }
            f = fl.data(); fc = (int64_t)(FR + k - 1) * span; fr = span;
          }
          // the next block's window in g (also for border tiles: their copies read it)
          const T* fn = c0 + 2 * FC <= c_end ? gb + FC * HW + (int64_t)i0 * W + j0
                        : pf ? g + ((int64_t)b * C + cg * CG) * HW + (int64_t)i0n * W + j0n : nullptr;
          const Sink<T> out{o, HWp, Wp, nvalid, stream, carry.data() + (size_t)(c0 - cg * CG) * FR * L,
                            FR * L, x0 == 0, x0 + L >= Wp};
          fwd_block<T, FC, FR>(f, fc, fr, wt_, wt, k, out, nr, cb, fn, HW, W);
        }
      }
    }
    stream_fence(stream);
  });
}

// One image row from tap-major to pixel-major: src tap t at src + t*ts (W values each) ->
// dst (W x K2, contiguous). 16-pixel column blocks, as in hwk_to_tap.
template <typename T>
inline void tap_row_to_hwk(const T* src, int64_t ts, T* dst, int W, int K2) {
  for (int j0 = 0; j0 < W; j0 += 16) {
    const int jn = std::min(16, W - j0);
    T* db = dst + (int64_t)j0 * K2;
    for (int t = 0; t < K2; ++t) {
      const T* sr = src + (int64_t)t * ts + j0;
      for (int j = 0; j < jn; ++j) db[(int64_t)j * K2 + t] = sr[j];
    }
  }
}

// o: (B,K2,H,W) if tap_major, else (B,H,W,K2): then each task's rows are summed tap-major in a
// scratch buffer (in L2) and transposed from there, not through a tap-major copy in memory.
template <typename T>
void corr_impl(const T* a, const T* p, T* o, int B, int C, int H, int W, int k, bool tap_major) {
  constexpr int L = Vec<T>::L;
  constexpr int CR = 3;  // rows of corr_tile's register tile
  const int Hp = H + k - 1, Wp = W + k - 1, K2 = k * k;
  const int64_t HW = (int64_t)H * W, HWp = (int64_t)Hp * Wp;
  // The channel sum is split in blocks of CC so that the rows of a task (a: IT rows, p: IT+k-1
  // rows, CC channels each) stay in L2 while every output row of the task is visited.
  // CC = 96 (~1.5 MB of rows, so only partly in a 1 MB L2) measured 1-3 % faster than 64 (fewer
  // passes over the task's output rows); IT = 9, CC = 48 was no faster.
  const int IT = 6, CC = 96;
  const int nit = (H + IT - 1) / IT;
  at::parallel_for(0, (int64_t)B * nit, 1, [&](int64_t begin, int64_t end) {
    upfeat_simd::FlushDenormals ftz;
    const int span = (L + k - 1 + L - 1) / L * L;
    // al: one tile's a (CC x CR x L): its channels lie H*W floats apart in place, a multiple of
    // 4 KB for sizes like 224², so they would all fall in one L1 set.
    std::vector<T> al((size_t)CC * CR * L), pl((size_t)CC * (CR + k - 1) * span, T(0));
    std::vector<T> scratch(tap_major ? 0 : (size_t)K2 * IT * W);
    for (int64_t task = begin; task < end; ++task) {
      const int b = task / nit, it = task % nit, i_end = std::min(H, (it + 1) * IT);
      // this task's output: tap t, row it*IT + r at ot0 + t*ot + r*W
      T* ot0 = tap_major ? o + (int64_t)b * K2 * HW + (int64_t)it * IT * W : scratch.data();
      const int64_t ot = tap_major ? HW : (int64_t)IT * W;
      for (int c0 = 0; c0 < C; c0 += CC) {
        const int cc = std::min(CC, C - c0);
        const T* ab = a + ((int64_t)b * C + c0) * HW;
        const T* pb = p + ((int64_t)b * C + c0) * HWp;
        for (int i = it * IT; i < i_end; i += CR) {
          const int nr = std::min(CR, i_end - i);
          T* ob = ot0 + (int64_t)(i - it * IT) * W;
          for (int j0 = 0; j0 < W; j0 += L) {
            const int nvalid = std::min(L, W - j0);
            for (int c = 0; c < cc; ++c)
              for (int r = 0; r < CR; ++r)
                copy_part(&al[((size_t)c * CR + r) * L], ab + c * HW + (int64_t)(i + r) * W + j0, 0,
                          r < nr ? nvalid : 0, L);
            const T* pp = pb + (int64_t)i * Wp + j0;
            int64_t pc = HWp, pr = Wp;
            if (nvalid < L) {  // border tile: zero-padded local copy of the feat rows
              for (int c = 0; c < cc; ++c)
                for (int r = 0; r < nr + k - 1; ++r)
                  copy_part(&pl[((size_t)c * (CR + k - 1) + r) * span], pp + c * HWp + (int64_t)r * Wp, 0,
                            nvalid + k - 1, span);
              pp = pl.data(); pc = (int64_t)(CR + k - 1) * span; pr = span;
            }
            // the next tile's a, for corr_tile to prefetch: 10 % at 448²
            const T* an = nullptr;
            int an_rows = 0, an_ch = cc;
            if (j0 + L < W) {
              an = ab + (int64_t)i * W + j0 + L, an_rows = nr;
            } else if (i + CR < i_end) {
              an = ab + (int64_t)(i + CR) * W, an_rows = std::min(CR, i_end - i - CR);
            } else if (c0 + CC < C) {
              an = ab + (int64_t)CC * HW + (int64_t)it * IT * W, an_rows = std::min(CR, i_end - it * IT);
              an_ch = std::min(CC, C - c0 - CC);
            }
            if (nr == CR) {
              corr_taps<T, CR>(al.data(), CR * L, pp, pc, pr, cc, k, ob + j0, ot, W, nvalid, c0 > 0, an, HW, W,
                               an_rows, an_ch);
            } else {  // the band's last rows, one at a time
              for (int r = 0; r < nr; ++r)
                corr_taps<T, 1>(al.data() + r * L, CR * L, pp + r * pr, pc, pr, cc, k, ob + j0 + (int64_t)r * W, ot,
                                W, nvalid, c0 > 0);
            }
          }
        }
      }
      if (!tap_major)
        for (int i = it * IT; i < i_end; ++i)
          tap_row_to_hwk(ot0 + (int64_t)(i - it * IT) * W, ot, o + ((int64_t)b * H + i) * W * K2, W, K2);
    }
  });
}

void check_inputs(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              " must be float32 or float64");
}

// Every size relation the kernels rely on: a mismatch would read or write out of bounds.
void check_weights(const at::Tensor& w, int64_t k, bool tap_major, int64_t B, int64_t H, int64_t W) {
  TORCH_CHECK(k >= 1 && k % 2 == 1, "k must be odd and positive, got ", k);
  TORCH_CHECK(w.dim() == 4, "weights must be 4-D, got ", w.sizes());
  const int64_t want[4] = {B, tap_major ? k * k : H, tap_major ? H : W, tap_major ? W : k * k};
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK(w.size(d) == want[d], "weights of shape ", w.sizes(), " do not fit: expected (",
                want[0], ", ", want[1], ", ", want[2], ", ", want[3], ")",
                tap_major ? " (tap-major B,k*k,H,W)" : " (pixel-major B,H,W,k*k)");
}

void check_pair(const at::Tensor& x, const at::Tensor& y, const char* xn, const char* yn) {
  TORCH_CHECK(x.dim() == 4 && y.dim() == 4, xn, " and ", yn, " must be 4-D, got ", x.sizes(),
              " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), xn, " and ", yn, " must have the same dtype");
}

void check_padded(const at::Tensor& p, int64_t B, int64_t C, int64_t H, int64_t W, int64_t k,
                  const char* name) {
  TORCH_CHECK(p.size(0) == B && p.size(1) == C && p.size(2) == H + k - 1 && p.size(3) == W + k - 1,
              name, " of shape ", p.sizes(), " does not fit: expected (", B, ", ", C, ", ",
              H + k - 1, ", ", W + k - 1, ") for a ", H, "x", W, " output and k = ", k);
}

}  // namespace

// The output pool for the other source files of this extension (band_matmul.cpp).
at::Tensor upfeat_pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  return pooled_empty(sizes, opt);
}

at::Tensor band_matmul(const at::Tensor& x, const at::Tensor& ah, const at::Tensor& aw);
void tap_softmax_(at::Tensor& logits, const at::Tensor& log_s, double thr);

// Weights come tap-major (B,K2,H,W) or pixel-major (B,H,W,K2): `tap_major` says which; the
// kernels work tap-major (contiguous along image rows) and convert the small weight tensor here.

// pixel-major (B,H,W,k*k) -> tap-major (B,k*k,H,W), the layout every kernel reads (so an
// autograd caller converts once and hands the copy to both the forward and tr).
at::Tensor acv_to_tap(const at::Tensor& w, int64_t k) {
  check_inputs(w, "weights");
  TORCH_CHECK(w.dim() == 4 && w.size(3) == k * k, "weights must be (B, H, W, k*k), got ", w.sizes());
  const int B = w.size(0), H = w.size(1), W = w.size(2);
  auto out = pooled_empty({B, k * k, H, W}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "acv_to_tap", [&] {
    hwk_to_tap<scalar_t>(w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, H, W, k * k);
  });
  return out;
}

// feat (B,C,Hp,Wp), w -> out (B,C,H,W): each out[b] contiguous, any batch stride (a channel
// slice of a larger output, so a caller assembling channel groups needs no copy).
void acv_fwd_into(const at::Tensor& feat, const at::Tensor& w, int64_t k, bool tap_major, at::Tensor& out) {
  check_inputs(feat, "feat"); check_inputs(w, "weights");
  check_pair(feat, w, "feat", "weights");
  const int B = feat.size(0), C = feat.size(1);
  const int H = tap_major ? w.size(2) : w.size(1), W = tap_major ? w.size(3) : w.size(2);
  check_weights(w, k, tap_major, B, H, W);
  check_padded(feat, B, C, H, W, k, "feat");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == feat.scalar_type() && out.dim() == 4 &&
              out.size(0) == B && out.size(1) == C && out.size(2) == H && out.size(3) == W &&
              out.stride(3) == 1 && out.stride(2) == W && out.stride(1) == (int64_t)H * W,
              "out must be (", B, ", ", C, ", ", H, ", ", W, ") of feat's dtype with contiguous "
              "(C, H, W) blocks, got ", out.sizes(), " strides ", out.strides());
  const at::Tensor wt = tap_major ? w : acv_to_tap(w, k);
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "acv_fwd", [&] {
    fwd_impl<scalar_t>(feat.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                       out.stride(0), B, C, H, W, (int)k);
  });
}

// feat (B,C,Hp,Wp), w -> (B,C,H,W)
at::Tensor acv_fwd(const at::Tensor& feat, const at::Tensor& w, int64_t k, bool tap_major) {
  TORCH_CHECK(feat.dim() == 4 && w.dim() == 4, "feat and weights must be 4-D, got ", feat.sizes(),
              " and ", w.sizes());
  const int H = tap_major ? w.size(2) : w.size(1), W = tap_major ? w.size(3) : w.size(2);
  auto out = pooled_empty({feat.size(0), feat.size(1), H, W}, feat.options());
  acv_fwd_into(feat, w, k, tap_major, out);
  return out;
}

// g (B,C,H,W), w -> (B,C,H+k-1,W+k-1)
at::Tensor acv_tr(const at::Tensor& g, const at::Tensor& w, int64_t k, bool tap_major) {
  check_inputs(g, "grad"); check_inputs(w, "weights");
  check_pair(g, w, "grad", "weights");
  const int B = g.size(0), C = g.size(1), H = g.size(2), W = g.size(3);
  check_weights(w, k, tap_major, B, H, W);
  const at::Tensor wt = tap_major ? w : acv_to_tap(w, k);
  auto out = pooled_empty({B, C, H + k - 1, W + k - 1}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "acv_tr", [&] {
    tr_impl<scalar_t>(g.data_ptr<scalar_t>(), wt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                      B, C, H, W, (int)k);
  });
  return out;
}

// a (B,C,H,W), p (B,C,H+k-1,W+k-1) -> (B,K2,H,W) if tap_major else (B,H,W,K2)
at::Tensor acv_corr(const at::Tensor& a, const at::Tensor& p, int64_t k, bool tap_major) {
  check_inputs(a, "a"); check_inputs(p, "p");
  check_pair(a, p, "a", "p");
  TORCH_CHECK(k >= 1 && k % 2 == 1, "k must be odd and positive, got ", k);
  const int B = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3);
  check_padded(p, B, C, H, W, k, "p");
  auto out = tap_major ? pooled_empty({B, k * k, H, W}, a.options()) : pooled_empty({B, H, W, k * k}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "acv_corr", [&] {
    corr_impl<scalar_t>(a.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                        B, C, H, W, (int)k, tap_major);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("empty_cache", [] { return Pool::get().empty(); }, "free pooled output blocks; returns bytes");
  m.def("cached_bytes", [] { return Pool::get().cached(); }, "bytes held by the output pool");
  m.def("set_cache_limit", [](size_t b) { Pool::get().set_cap(b); }, "max bytes the pool keeps");
  m.def("empty", [](std::vector<int64_t> sizes, const at::Tensor& like) {
    return pooled_empty(sizes, like.options()); }, "uninitialised tensor from the output pool");
  m.def("fwd", &acv_fwd, "adaptive conv forward");
  m.def("fwd_into", &acv_fwd_into, "adaptive conv forward into a given output");
  m.def("tap_softmax_", &tap_softmax_, "in-place softmax over taps of tap-major JBU logits");
  m.def("to_tap", &acv_to_tap, "pixel-major weights to tap-major");
  m.def("tr", &acv_tr, "adjoint of the forward w.r.t. feat");
  m.def("corr", &acv_corr, "local correlation (adjoint w.r.t. weights)");
  m.def("band_matmul", &band_matmul, "ah @ x @ aw^T for banded ah, aw (separable resize)");
}
