// exp(x) for fp32 in plain arithmetic that compilers vectorise (no libm call, no branch): a range reduction
// x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for exp(r), and 2^n from the exponent bits.
// Relative error below 2e-7 (about 2 ulp); x below -87.3 gives 0 (exp would be subnormal there), a result
// above the largest float gives inf, NaN gives NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace dia_fast {

inline float fast_exp(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 89.0f ? 89.0f : x);
  // round(xc / ln2) to an integer-valued float with the 1.5 * 2^23 trick (round to nearest even)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split in two: r carries no rounding
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as 2^h * 2^(n - h): n reaches 128 near the top of the range, past the largest exponent of one float
  const int32_t ni = static_cast<int32_t>(n), h = ni / 2;
  const int32_t bits_lo = (h + 127) << 23, bits_hi = (ni - h + 127) << 23;
  float lo, hi;
  std::memcpy(&lo, &bits_lo, sizeof lo);
  std::memcpy(&hi, &bits_hi, sizeof hi);
  const float y = x < -87.3f ? 0.0f : p * lo * hi;
  return x != x ? x : y;
}

}  // namespace dia_fast
