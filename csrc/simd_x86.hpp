// x86 SIMD for the weight-only GEMMs (linear.cpp, linear_int4.cpp): DIA_FAST_X86_SIMD is defined where the
// compiler can build per-function AVX2 / AVX-512 code (target attributes), chosen at run time by the callers.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define DIA_FAST_X86_SIMD 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the deliberately undefined pass-through operand inside its own AVX-512 intrinsics
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace dia_fast {

// the sum of an AVX vector's 8 floats
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

}  // namespace dia_fast

#endif  // x86 with GCC or Clang
