// Rounding of fp32 activation rows to int16 for the weight-only integer GEMMs (linear.cpp, linear_int4.cpp).
//
// Each row is rounded against its own max |x| to 32767 levels (relative error <= 2^-16 of that max, far below
// the weights' rounding), so that the products are exact integer multiply-adds. Rows holding NaN or inf are left
// to the callers' fp32 loops, so that those values propagate as in fp32. Rows whose max |x| is below 2^-64 are
// first scaled up by 2^64 (exact: a power of two), so that 32767 / max|x| cannot overflow nor max|x| / 32767 go
// subnormal; the callers multiply their outputs by `unscale` (2^-64 there, 1 elsewhere), so tiny and subnormal rows
// keep the same relative accuracy.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace dia_fast {

constexpr float kXLevels = 32767.0f;
constexpr float kTinyRow = 0x1p-64f;  // rows with max |x| below this are scaled up by kTinyUp first
constexpr float kTinyUp = 0x1p64f;

// max |x| of a row (16 lanes: vectorised by the compiler)
inline float row_amax(const float* __restrict x, int64_t n) {
  float top[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int l = 0; l < 16; ++l) {
      const float v = std::fabs(x[k + l]);
      top[l] = top[l] < v ? v : top[l];
    }
  for (int l = 0; k < n; ++k, ++l) top[l] = top[l] < std::fabs(x[k]) ? std::fabs(x[k]) : top[l];
  float amax = 0.0f;
  for (int l = 0; l < 16; ++l) amax = amax < top[l] ? top[l] : amax;
  return amax;
}

// whether every value of a row is finite: x * 0 is NaN for NaN and inf, 0 otherwise
inline bool row_finite(const float* __restrict x, int64_t n) {
  float probe[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int l = 0; l < 16; ++l) probe[l] += x[k + l] * 0.0f;
  for (int l = 0; k < n; ++k, ++l) probe[l] += x[k] * 0.0f;
  float sum = 0.0f;
  for (int l = 0; l < 16; ++l) sum += probe[l];
  return sum == 0.0f;
}

// q = rint(x * pre * inv) for |x * pre * inv| <= 32767 (pre: 1 or kTinyUp, so x * pre is exact): adding and
// removing 1.5 * 2^23 rounds half to even (the FPU's default mode; no -ffast-math here), and unlike lrint the
// compiler vectorises it
inline void round_row(const float* __restrict x, float pre, float inv, int16_t* __restrict q, int64_t n) {
  for (int64_t k = 0; k < n; ++k) q[k] = int16_t(int32_t((x[k] * pre * inv + 12582912.0f) - 12582912.0f));
}

// The rounded rows of x [M, K] (row stride ldx): xq [M, Kp] int16 (zero past K, Kp = K rounded up to `align`),
// xs [M] their scales (0: a zero row, or a row holding NaN or inf, listed in `special`), unscale [M] the factor
// that undoes a tiny row's scaling up (1 for other rows): x ~= xq * xs * unscale.
struct RoundedRows {
  std::vector<int16_t> xq;
  std::vector<float> xs;
  std::vector<float> unscale;
  std::vector<int64_t> special;
  int64_t Kp = 0;
};

inline RoundedRows round_rows(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t align) {
  RoundedRows r;
  r.Kp = (K + align - 1) / align * align;
  r.xq.assign(size_t(M * r.Kp), 0);
  r.xs.assign(size_t(M), 0.0f);
  r.unscale.assign(size_t(M), 1.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    if (!row_finite(xr, K)) {
      r.special.push_back(m);
      continue;
    }
    const float amax = row_amax(xr, K);
    if (amax == 0.0f) continue;
    const float pre = amax < kTinyRow ? kTinyUp : 1.0f;
    round_row(xr, pre, kXLevels / (amax * pre), r.xq.data() + m * r.Kp, K);
    r.xs[size_t(m)] = amax * pre / kXLevels;
    r.unscale[size_t(m)] = 1.0f / pre;
  }
  return r;
}

}  // namespace dia_fast
