// The attention ops of a decode step in fp32: RoPE + KV-cache write, and one query step of GQA attention
// against a cache (keys below a per-row length and inside an optional key mask).
//
// The query heads of one KV head are computed together, so each cached key and value is read once per
// step for all of them. Scores are kept for the whole row (at most a few thousand per head), then
// softmax and the weighted sum of values follow, as in the reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "fast_exp.hpp"
#include "kernels.hpp"

namespace dia_fast {

namespace {

#if defined(__GNUC__) || defined(__clang__)
// 16 floats as one value (GCC / Clang vector extension): one zmm register in the AVX-512 clone, two ymm or four
// xmm elsewhere, and never a stack array that the loop would reload
typedef float f32x16 __attribute__((vector_size(64)));

// (no function takes or returns an f32x16: that would change the calling convention between the clones)
// out[g] = dot(q + g * D, k) for the G query heads of a KV head (k read once for all of them)
inline void dots(const float* __restrict q, int64_t G, const float* __restrict k, int64_t D, float* __restrict out) {
  const int64_t D16 = D / 16 * 16;
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int64_t gn = std::min<int64_t>(4, G - g0);
    f32x16 acc[4] = {};
    for (int64_t d = 0; d < D16; d += 16) {
      f32x16 kv, qv;
      std::memcpy(&kv, k + d, sizeof kv);
      for (int64_t g = 0; g < gn; ++g) {
        std::memcpy(&qv, q + (g0 + g) * D + d, sizeof qv);
        acc[g] += qv * kv;
      }
    }
    for (int64_t g = 0; g < gn; ++g) {
      float x[16];
      std::memcpy(x, &acc[g], sizeof x);
      for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) x[l] += x[l + w];
      for (int64_t d = D16; d < D; ++d) x[0] += q[(g0 + g) * D + d] * k[d];
      out[g0 + g] = x[0];
    }
  }
}
#else
inline void dots(const float* q, int64_t G, const float* k, int64_t D, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * k[d];
    out[g] = s;
  }
}
#endif

// rotate-half RoPE of one head: out = [x1 * c - x2 * s, x2 * c + x1 * s]
inline void rotate(const float* __restrict x, const float* __restrict c, const float* __restrict s, int64_t half,
                   float* __restrict out) {
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * c[i] - x[half + i] * s[i];
    out[half + i] = x[half + i] * c[i] + x[i] * s[i];
  }
}

inline void exp_shifted(float* __restrict x, float shift, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = fast_exp(x[i] - shift);
}

inline void scale_in_place(float* __restrict x, float w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= w;
}

inline void add_scaled(const float* __restrict v, float w, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += w * v[i];
}

// Row r of rope_kv_write (its positions checked), compiled per ISA as a whole.
DIA_FAST_CLONES void rope_row(const RopeKvArgs& a, int64_t r, int64_t start) {
  const int64_t half = a.D / 2, W = (a.Hq + 2 * a.Hkv) * a.D;
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t p = start + t;
    const float* c = a.cos + p * half;
    const float* s = a.sin + p * half;
    const float* x = a.qkv + (r * a.T + t) * W;
    for (int64_t h = 0; h < a.Hq; ++h) rotate(x + h * a.D, c, s, half, a.q_out + ((r * a.Hq + h) * a.T + t) * a.D);
    for (int64_t h = 0; h < a.Hkv; ++h) {
      const int64_t at = r * a.cache_sr + h * a.cache_sh + p * a.D;
      rotate(x + (a.Hq + h) * a.D, c, s, half, a.k_cache + at);
      const float* v = x + (a.Hq + a.Hkv + h) * a.D;
      std::copy(v, v + a.D, a.v_cache + at);
    }
  }
}

}  // namespace

int64_t rope_kv_write(const RopeKvArgs& a) {
  const int64_t limit = std::min(a.L, a.P);
  auto start_of = [&a](int64_t r) { return a.n_start == 0 ? int64_t(0) : a.start[a.n_start == 1 ? 0 : r]; };
  for (int64_t r = 0; r < a.R; ++r)
    if (start_of(r) < 0 || start_of(r) + a.T > limit) return r;
  for (int64_t r = 0; r < a.R; ++r) rope_row(a, r, start_of(r));
  return -1;
}

namespace {

// One (row, KV head) of decode_attention: its G query heads against the keys the row attends. A unit of work
// of its own, compiled per ISA as a whole so that the small loops above inline into it.
DIA_FAST_CLONES void attend(const DecodeAttentionArgs& a, int64_t b, int64_t j, std::vector<float>& scores) {
  const int64_t G = a.Hq / a.Hkv, D = a.D;
  int64_t n = a.L;
  if (a.n_len > 0) n = std::max<int64_t>(0, std::min(n, a.kv_len[a.n_len == 1 ? 0 : b]));
  const float* k = a.k + b * a.k_sb + j * a.k_sh;
  const float* v = a.v + b * a.v_sb + j * a.v_sh;
  const uint8_t* mask = a.key_mask == nullptr ? nullptr : a.key_mask + b * a.mask_sb;
  const float* q = a.q + (b * a.Hq + j * G) * D;  // the G query heads of KV head j
  float* out = a.out + (b * a.Hq + j * G) * D;
  std::fill(out, out + G * D, 0.0f);
  // scores [G, n]; keys outside the mask score -inf (weight exactly 0 after the exp)
  scores.resize(size_t(G * std::max<int64_t>(n, 1)));
  float top[kMaxGroup];
  std::fill(top, top + G, -std::numeric_limits<float>::infinity());
  float qk[kMaxGroup];
  for (int64_t t = 0; t < n; ++t) {
    const bool skip = mask != nullptr && !mask[t];
    if (!skip) dots(q, G, k + t * D, D, qk);
    for (int64_t g = 0; g < G; ++g) {
      const float s = skip ? -std::numeric_limits<float>::infinity() : qk[g] * a.scale;
      scores[size_t(g * n + t)] = s;
      if (s > top[g] || s != s) top[g] = s;  // a NaN score sticks
    }
  }
  // softmax per head: weights in place of the scores, scaled by 1 / their sum (0 for a head with no output)
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * n;
    // No key attended, or a NaN or +inf score: the reference's softmax is NaN there and its nan_to_num turns the
    // head's output into zeros; so here.
    if (!std::isfinite(top[g])) {
      std::fill(sg, sg + n, 0.0f);
      continue;
    }
    exp_shifted(sg, top[g], n);
    float total = 0.0f;
    for (int64_t t = 0; t < n; ++t) total += sg[t];
    scale_in_place(sg, 1.0f / total, n);
  }
  // out[g] = sum_t weight[g, t] v[t]: each value row read once for the G heads
  for (int64_t t = 0; t < n; ++t) {
    if (mask != nullptr && !mask[t]) continue;  // never read: a masked value may be anything
    for (int64_t g = 0; g < G; ++g) add_scaled(v + t * D, scores[size_t(g * n + t)], out + g * D, D);
  }
}

}  // namespace

void decode_attention(const DecodeAttentionArgs& a) {
  // The keys and values read (of the longest row), not the cache's length, decide whether a second thread pays
  // off: a step's caches come from memory (the GEMMs in between have flushed them), and one core alone draws
  // about half the memory bandwidth of two.
  int64_t n = a.L;
  if (a.n_len > 0) {
    n = 0;
    for (int64_t i = 0; i < a.n_len; ++i) n = std::max(n, std::min(a.L, a.kv_len[i]));
  }
  const int64_t work = 2 * a.B * a.Hkv * n * a.D;
#pragma omp parallel if (work >= kAttentionParallelFloats)
  {
    std::vector<float> scores;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < a.B * a.Hkv; ++task) attend(a, task / a.Hkv, task % a.Hkv, scores);
  }
}

}  // namespace dia_fast
