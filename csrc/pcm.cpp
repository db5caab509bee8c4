// float32 -> int16 PCM conversion (optionally with TPDF dither); see kernels.hpp.
#include "kernels.hpp"

namespace dia_fast {
namespace {

// The arithmetic is in double: a float32 sample times 32767 (15 bits) is exact in a double's
// 53-bit mantissa, so the only rounding is the final one (as numpy's float64 reference does; a
// float32 product would round first and could flip a tie). (y + 1.5 * 2^52) - 1.5 * 2^52 rounds y
// to an integer, half to even (the FPU's default mode), for |y| < 2^51: plain arithmetic that
// vectorises on baseline SSE2 / NEON. Clipping before rounding equals clipping after (integer bounds).
constexpr double kRoundMagic = 6755399441055744.0;

inline int16_t to_pcm16(double y) {
  y = (y == y) ? y : 0.0;  // NaN -> 0
  y = y < -32768.0 ? -32768.0 : y;
  y = y > 32767.0 ? 32767.0 : y;
  y = (y + kRoundMagic) - kRoundMagic;
  return static_cast<int16_t>(y);
}

// Uniform in [-0.5, 0.5) with 24 random bits (exact in float and double).
inline double uniform_half(uint64_t seed, uint64_t n) {
  return double(splitmix64_at(seed, n) >> 40) * (1.0 / 16777216.0) - 0.5;
}

// The plain conversion is memory-bound and vectorises; on x86-64 GCC also builds AVX2 / AVX-512 clones
// chosen at load time (kernels.hpp).
DIA_FAST_CLONES void convert_plain(const float* src, int16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_pcm16(double(src[i]) * 32767.0);
}

}  // namespace

void float_to_pcm16(const float* src, int16_t* dst, int64_t n, bool dither, uint64_t seed) {
  if (!dither) {
    convert_plain(src, dst, n);
    return;
  }
#if defined(DIA_FAST_OPENMP)
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements / 4)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t k = 2 * uint64_t(i);
    const double noise = uniform_half(seed, k) + uniform_half(seed, k + 1);  // exact: both are j * 2^-24
    dst[i] = to_pcm16(double(src[i]) * 32767.0 + noise);
  }
}

}  // namespace dia_fast
