// Row-wise fp32 ops of a decode step: residual add + RMSNorm, SwiGLU, the multi-channel code embedding.
//
// On a CPU a decode step's non-GEMM ops are a few thousand floats each: PyTorch spends far more time
// dispatching their 4-8 elementwise ops than computing them, and the int8 GEMMs around them have
// flushed the caches each time. One call per op here, in the order and rounding of the references
// (no FMA contraction: products are rounded as in PyTorch's separate multiply and add).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fast_exp.hpp"
#include "kernels.hpp"

namespace dia_fast {

namespace {

// sum of x[i]^2 in 16 fp32 lanes (vectorised by the compiler; a deterministic order)
inline float sum_squares(const float* __restrict x, int64_t n) {
  float lane[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] += x[i + l] * x[i + l];
  for (int l = 0; i < n; ++i, ++l) lane[l] += x[i] * x[i];
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

// One row of add_rmsnorm (h_out == nullptr: no delta, h is the residual).
DIA_FAST_CLONES void norm_row(const float* __restrict residual, const float* __restrict delta,
                              const float* __restrict weight, float eps, int64_t D, float* __restrict normed,
                              float* __restrict h_out) {
  const float* h = residual;
  if (h_out != nullptr) {
    for (int64_t i = 0; i < D; ++i) h_out[i] = residual[i] + delta[i];
    h = h_out;
  }
  const float inv = 1.0f / std::sqrt(sum_squares(h, D) / float(D) + eps);
  for (int64_t i = 0; i < D; ++i) normed[i] = h[i] * inv * weight[i];
}

DIA_FAST_CLONES void swiglu_row(const float* __restrict g, const float* __restrict u, float* __restrict out,
                                int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + fast_exp(-g[i])) * u[i];
}

// One row of embed_codes: the C table rows of its codes summed in channel order.
DIA_FAST_CLONES void embed_row(const int64_t* __restrict codes, int64_t C, const float* __restrict table,
                               int64_t vocab, int64_t D, float* __restrict out) {
  const float* first = table + codes[0] * D;
  std::copy(first, first + D, out);
  for (int64_t c = 1; c < C; ++c) {
    const float* e = table + (c * vocab + codes[c]) * D;
    for (int64_t i = 0; i < D; ++i) out[i] += e[i];
  }
}

}  // namespace

void add_rmsnorm(const float* residual, const float* delta, const float* weight, float eps, int64_t rows, int64_t D,
                 float* normed, float* h_out) {
#pragma omp parallel for schedule(static) if (rows * D >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r)
    norm_row(residual + r * D, delta == nullptr ? nullptr : delta + r * D, weight, eps, D, normed + r * D,
             delta == nullptr ? nullptr : h_out + r * D);
}

void swiglu(const float* gate_up, int64_t rows, int64_t H, float* out) {
#pragma omp parallel for schedule(static) if (rows * H >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) swiglu_row(gate_up + r * 2 * H, gate_up + r * 2 * H + H, out + r * H, H);
}

int64_t embed_codes(const int64_t* codes, int64_t rows, int64_t C, const float* table, int64_t vocab, int64_t D,
                    float* out) {
  for (int64_t i = 0; i < rows * C; ++i)
    if (codes[i] < 0 || codes[i] >= vocab) return i;
#pragma omp parallel for schedule(static) if (rows * C * D >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) embed_row(codes + r * C, C, table, vocab, D, out + r * D);
  return -1;
}

}  // namespace dia_fast
