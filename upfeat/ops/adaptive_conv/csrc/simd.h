// 64-byte vectors for the extension's kernels (GCC/Clang vector extensions: AVX-512 registers
// when -march=native has them, two AVX2 registers otherwise), with unaligned loads and stores.
#pragma once
#include <cstring>

namespace upfeat_simd {

typedef float vfloat __attribute__((vector_size(64)));
typedef double vdouble __attribute__((vector_size(64)));
template <typename T> struct Vec;
template <> struct Vec<float> { using type = vfloat; static constexpr int L = 16; };
template <> struct Vec<double> { using type = vdouble; static constexpr int L = 8; };

template <typename V> inline V vload(const void* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V> inline void vstore(void* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

}  // namespace upfeat_simd
