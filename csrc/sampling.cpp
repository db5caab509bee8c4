// CFG sampling step on the CPU: the semantics of dia_fast.ops.reference.cfg_sample, with the
// multinomial draw replaced by an inverse-CDF walk driven by a caller-provided uniform.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "kernels.hpp"

namespace dia_fast {
namespace {

// Monotone map float -> uint32 (larger float, larger key), so a (key, ~index) pair packs into one
// uint64 whose order is "larger logit first, then lower token id first".
// -0.0 and +0.0 map to one key (they are equal logits).
inline uint32_t ordered_bits(float f) {
  f = f == 0.0f ? 0.0f : f;
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  // negative: flip every bit; positive: set the sign bit (branch-free)
  return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
}

struct Scratch {
  std::vector<uint64_t> keys;
  std::vector<int64_t> cand;    // candidate token ids, ascending
  std::vector<double> weight;   // unnormalised probability of each candidate
  std::vector<int32_t> order;   // candidate positions by decreasing weight (top-p)
  std::vector<uint8_t> kept;    // candidate survives top-p
  std::vector<float> guided;    // the guided logits of a row without a CFG filter
  std::vector<float> z;         // candidate logits / temperature (seeded rows)
};

// The first candidate holding the largest logit (torch.argmax semantics over a row that is -inf
// outside the candidates); 0 when every candidate is -inf, as torch.argmax of an all -inf row.
inline int64_t argmax_of(const float* row, const std::vector<int64_t>& cand) {
  int64_t best_id = 0;
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t id : cand) {
    if (std::isnan(row[id])) return id;  // NaN is the maximum, as in torch.argmax (the first one wins)
    if (row[id] > best) {  // strict: ties keep the lower id
      best = row[id];
      best_id = id;
    }
  }
  return best_id;
}

inline bool has_nan(const float* row, const std::vector<int64_t>& cand) {
  for (int64_t id : cand) {
    if (std::isnan(row[id])) return true;
  }
  return false;
}

// Special tokens among the candidates (ids ascending): ids above EOS never; EOS only where the row may end
// (channel 0, past min_new_tokens), and there it is the only candidate when it is the argmax of ``x``.
void restrict_special(const float* x, int64_t eos, bool may_end, std::vector<int64_t>& cand) {
  const int64_t last_allowed = may_end ? eos : eos - 1;
  cand.erase(std::upper_bound(cand.begin(), cand.end(), last_allowed), cand.end());
  if (!may_end) return;
  if (argmax_of(x, cand) == eos) {
    cand.assign(1, eos);
  } else if (!cand.empty() && cand.back() == eos) {
    cand.pop_back();
  }
}

// The k best ids (ascending, into s.cand) of the guided logits cond + scale * (cond - uncond), 0 < k < V.
// Branch-free filtering: every key is written to a buffer and the fill count advances only when the key beats
// the k-th best key seen so far; when the buffer is full, nth_element shrinks it back to the best k and raises
// that threshold. On fresh logits (every decode step) this avoids the per-element branch mispredictions of a
// heap or a full nth_element, which made those 5-10x slower.
void top_k_candidates(const float* cr, const float* ur, int64_t V, float scale, int64_t k, Scratch& s) {
  std::vector<int64_t>& cand = s.cand;
  const int64_t cap = std::max<int64_t>(4 * k, 256);
  std::vector<uint64_t>& buf = s.keys;
  buf.resize(static_cast<size_t>(cap));
  const auto better = std::greater<uint64_t>();
  uint64_t thr = 0;  // keys are never 0: their low 32 bits are 0xFFFFFFFF - id with id < V < 2^32
  int64_t n = 0;
  for (int64_t i = 0; i < V; ++i) {
    const float diff = cr[i] - ur[i];
    const float guided = cr[i] + scale * diff;  // two roundings, like torch's mul then add
    const uint64_t key = (uint64_t(ordered_bits(guided)) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(i));
    buf[n] = key;
    n += key > thr ? 1 : 0;
    if (n == cap) {
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + n, better);
      thr = buf[k - 1];
      n = k;
    }
  }
  if (n > k) std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + n, better);
  cand.clear();
  cand.reserve(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) cand.push_back(int64_t(0xFFFFFFFFu - uint32_t(buf[j] & 0xFFFFFFFFu)));
  std::sort(cand.begin(), cand.end());
}

int64_t sample_row(const float* cr, const float* ur, int64_t V, int64_t channel, const float* uniform,
                   const SampleParams& P, Scratch& s) {
  std::vector<int64_t>& cand = s.cand;
  cand.clear();

  // 1. top-k on the guided logits cond + scale * (cond - uncond); keep the COND logits there.
  if (P.top_k > 0 && P.top_k < V) {
    top_k_candidates(cr, ur, V, P.cfg_scale, P.top_k, s);
  } else {
    cand.resize(static_cast<size_t>(V));
    for (int64_t i = 0; i < V; ++i) cand[i] = i;
  }

  // 2. Special tokens: ids above EOS never; EOS only on channel 0, and there it is the only
  //    candidate when it is the argmax, else it is masked.
  restrict_special(cr, P.eos_id, channel == 0, cand);

  // Greedy, or a NaN among the candidates: the reference's argmax picks the first NaN (and a NaN weight would break
  // the top-p sort's ordering, which std::sort needs to stay within bounds).
  if (uniform == nullptr || has_nan(cr, cand)) return argmax_of(cr, cand);

  // 3. temperature, softmax weights (in double), top-p, inverse-CDF draw.
  const size_t n = cand.size();
  const float temp = P.temperature;
  s.weight.resize(n);
  float max_x = -std::numeric_limits<float>::infinity();
  for (size_t j = 0; j < n; ++j) max_x = std::max(max_x, cr[cand[j]] / temp);
  if (!(max_x > -std::numeric_limits<float>::infinity())) return argmax_of(cr, cand);  // nothing to draw
  double total = 0.0;
  for (size_t j = 0; j < n; ++j) {
    const float x = cr[cand[j]] / temp;
    const double w = std::exp(double(x) - double(max_x));
    s.weight[j] = w;
    total += w;
  }
  s.kept.assign(n, 1);
  if (P.top_p < 1.0f) {
    s.order.resize(n);
    for (size_t j = 0; j < n; ++j) s.order[j] = int32_t(j);
    const std::vector<double>& w = s.weight;
    std::sort(s.order.begin(), s.order.end(), [&w](int32_t a, int32_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); });
    // Keep an id while the mass ranked before it is <= top_p (the top id always stays).
    const double limit = double(P.top_p) * total;
    double before = 0.0;
    for (size_t r = 0; r < n; ++r) {
      if (r > 0 && before > limit) s.kept[s.order[r]] = 0;
      before += w[s.order[r]];
    }
  }
  double kept_total = 0.0;
  for (size_t j = 0; j < n; ++j) kept_total += s.kept[j] ? s.weight[j] : 0.0;
  const double target = double(*uniform) * kept_total;
  double acc = 0.0;
  int64_t chosen = -1;
  for (size_t j = 0; j < n; ++j) {
    if (!s.kept[j]) continue;
    acc += s.weight[j];
    chosen = cand[j];
    if (acc > target) break;
  }
  return chosen;
}

// Candidates of a seeded row (ids ascending) and the logits they are judged by: the cond logits at the top-k
// of the guided ones, every cond logit (k >= V), or the guided logits (no filter: k <= 0).
const float* row_candidates(const float* cr, const float* ur, int64_t V, float scale, int64_t k, Scratch& s) {
  std::vector<int64_t>& cand = s.cand;
  cand.clear();
  if (k > 0 && k < V) {  // the selection of sample_row's step 1, with this row's k and scale
    top_k_candidates(cr, ur, V, scale, k, s);
    return cr;
  }
  cand.resize(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) cand[i] = i;
  if (k >= V) return cr;
  s.guided.resize(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) s.guided[i] = cr[i] + scale * (cr[i] - ur[i]);
  return s.guided.data();
}

int64_t sample_row_seeded(const float* cr, const float* ur, int64_t V, int64_t channel, int64_t b,
                          const RowSampleParams& p, Scratch& s) {
  const float* x = row_candidates(cr, ur, V, p.cfg_scale[b], p.top_k[b], s);
  std::vector<int64_t>& cand = s.cand;
  // Special tokens: ids above EOS never; EOS only on channel 0 (and not at all before min_new_tokens), and
  // there it is the only candidate when it is the argmax, else it is masked.
  const bool may_end = p.allow_eos == nullptr || p.allow_eos[b] != 0;
  restrict_special(x, p.eos_id, channel == 0 && may_end, cand);
  const float temp = p.temperature[b];
  if (!(temp > 0.0f) || has_nan(x, cand)) return argmax_of(x, cand);  // greedy; or NaN: the first NaN, as torch

  const size_t n = cand.size();
  s.weight.resize(n);
  std::vector<float>& z = s.z;
  z.resize(n);
  float max_z = -std::numeric_limits<float>::infinity();
  for (size_t j = 0; j < n; ++j) {
    z[j] = x[cand[j]] / temp;  // IEEE division, as torch
    max_z = std::max(max_z, z[j]);
  }
  if (!(max_z > -std::numeric_limits<float>::infinity())) return argmax_of(x, cand);
  s.kept.assign(n, 1);
  if (p.top_p[b] < 1.0f) {  // nucleus: keep an id while the mass ranked above it is <= top_p
    double total = 0.0;
    for (size_t j = 0; j < n; ++j) {
      s.weight[j] = z[j] > -std::numeric_limits<float>::infinity() ? std::exp(double(z[j]) - double(max_z)) : 0.0;
      total += s.weight[j];
    }
    s.order.resize(n);
    for (size_t j = 0; j < n; ++j) s.order[j] = int32_t(j);
    // descending logit, ties to the lower id (candidates are in ascending id order)
    std::stable_sort(s.order.begin(), s.order.end(), [&z](int32_t a, int32_t c) { return z[a] > z[c]; });
    const double limit = double(p.top_p[b]) * total;
    double before = 0.0;
    for (size_t r = 0; r < n; ++r) {
      if (r > 0 && before > limit) s.kept[s.order[r]] = 0;
      before += s.weight[s.order[r]];
    }
  }
  const uint64_t key = p.seed[b];
  const uint64_t off = uint64_t(p.offset[b]);
  int64_t best_id = -1;
  float best = -std::numeric_limits<float>::infinity();
  for (size_t j = 0; j < n; ++j) {
    if (!s.kept[j] || !(z[j] > -std::numeric_limits<float>::infinity())) continue;
    const uint32_t r = philox4x32_first(uint32_t(cand[j]), uint32_t(channel), uint32_t(off), uint32_t(off >> 32),
                                        uint32_t(key), uint32_t(key >> 32));
    // 23 bits + 1/2 over 2^23: strictly inside (0, 1) in float (24 bits would round their top value to 1.0)
    const float u = (float(r >> 9) + 0.5f) * (1.0f / 8388608.0f);
    const float score = z[j] + (-std::log(-std::log(u)));
    if (best_id < 0 || score > best) {  // strict: ties keep the lower id
      best = score;
      best_id = cand[j];
    }
  }
  return best_id < 0 ? argmax_of(x, cand) : best_id;
}

}  // namespace

namespace {

// fn(row, b, c, scratch) for every (item b, channel c) row, in parallel when the work is large enough: a row
// selects, filters and draws over its V logits (microseconds each), so one decode step's 9 x 1028 logits already
// pay for waking a second thread.
constexpr int64_t kSampleParallelLogits = int64_t(1) << 13;
template <typename Fn>
void for_each_row(int64_t B, int64_t C, int64_t V, Fn fn) {
  const int64_t rows = B * C;
#if defined(DIA_FAST_OPENMP)
#pragma omp parallel if (rows > 1 && rows * V >= kSampleParallelLogits)
#endif
  {
    Scratch scratch;
#if defined(DIA_FAST_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t r = 0; r < rows; ++r) fn(r, r / C, r % C, scratch);
  }
}

}  // namespace

void cfg_sample_rows(const float* cond, const float* uncond, int64_t B, int64_t C, int64_t V, int64_t cond_sb,
                     int64_t cond_sc, int64_t uncond_sb, int64_t uncond_sc, int64_t* out, const RowSampleParams& p) {
  for_each_row(B, C, V, [&](int64_t r, int64_t b, int64_t c, Scratch& scratch) {
    out[r] = sample_row_seeded(cond + b * cond_sb + c * cond_sc, uncond + b * uncond_sb + c * uncond_sc, V, c, b, p,
                               scratch);
  });
}

void cfg_sample(const float* cond, const float* uncond, int64_t B, int64_t C, int64_t V, int64_t cond_sb,
                int64_t cond_sc, int64_t uncond_sb, int64_t uncond_sc, const float* uniforms, int64_t* out,
                const SampleParams& params) {
  for_each_row(B, C, V, [&](int64_t r, int64_t b, int64_t c, Scratch& scratch) {
    out[r] = sample_row(cond + b * cond_sb + c * cond_sc, uncond + b * uncond_sb + c * uncond_sc, V, c,
                        uniforms == nullptr ? nullptr : uniforms + r, params, scratch);
  });
}

}  // namespace dia_fast
