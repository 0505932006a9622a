// 64-byte vectors for the extension's kernels (GCC/Clang vector extensions: AVX-512 registers
// when -march=native has them, two AVX2 registers otherwise), with unaligned loads and stores.
#pragma once
#include <cstring>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace upfeat_simd {

typedef float vfloat __attribute__((vector_size(64)));
typedef double vdouble __attribute__((vector_size(64)));
template <typename T> struct Vec;
template <> struct Vec<float> { using type = vfloat; static constexpr int L = 16; };
template <> struct Vec<double> { using type = vdouble; static constexpr int L = 8; };

template <typename V> inline V vload(const void* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V> inline void vstore(void* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

// Subnormal inputs count as zero and subnormal results become zero (x86 DAZ + FTZ) while a
// kernel runs on this thread: every product touching a subnormal takes a ~10x slower microcode
// path, and sharp JBU kernels have them (9 % of the logits' gradient at 224²). The change is
// below 1.2e-38 (float) / 2.2e-308 (double) per term. Construct it inside each parallel body:
// the control register is per thread; the destructor restores the caller's mode.
struct FlushDenormals {
#if defined(__SSE__)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }  // FTZ bit 15, DAZ bit 6
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

}  // namespace upfeat_simd
