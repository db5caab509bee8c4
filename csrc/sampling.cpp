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
};

// The first candidate holding the largest logit (torch.argmax semantics over a row that is -inf
// outside the candidates); 0 when every candidate is -inf, as torch.argmax of an all -inf row.
inline int64_t argmax_of(const float* row, const std::vector<int64_t>& cand) {
  int64_t best_id = 0;
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t id : cand) {
    if (row[id] > best) {  // strict: ties keep the lower id
      best = row[id];
      best_id = id;
    }
  }
  return best_id;
}

int64_t sample_row(const float* cr, const float* ur, int64_t V, int64_t channel, const float* uniform,
                   const SampleParams& P, Scratch& s) {
  std::vector<int64_t>& cand = s.cand;
  cand.clear();

  // 1. top-k on the guided logits cond + scale * (cond - uncond); keep the COND logits there.
  //    Branch-free filtering: every key is written to a buffer and the fill count advances only
  //    when the key beats the k-th best key seen so far; when the buffer is full, nth_element
  //    shrinks it back to the best k and raises that threshold. On fresh logits (every decode
  //    step) this avoids the per-element branch mispredictions of a heap or a full nth_element,
  //    which made those 5-10x slower.
  if (P.top_k > 0 && P.top_k < V) {
    const int64_t k = P.top_k;
    const int64_t cap = std::max<int64_t>(4 * k, 256);
    const float scale = P.cfg_scale;
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
    cand.reserve(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) cand.push_back(int64_t(0xFFFFFFFFu - uint32_t(buf[j] & 0xFFFFFFFFu)));
    std::sort(cand.begin(), cand.end());
  } else {
    cand.resize(static_cast<size_t>(V));
    for (int64_t i = 0; i < V; ++i) cand[i] = i;
  }

  // 2. Special tokens: ids above EOS never; EOS only on channel 0, and there it is the only
  //    candidate when it is the argmax, else it is masked.
  const int64_t eos = P.eos_id;
  const int64_t last_allowed = channel == 0 ? eos : eos - 1;
  cand.erase(std::upper_bound(cand.begin(), cand.end(), last_allowed), cand.end());
  if (channel == 0) {
    if (argmax_of(cr, cand) == eos) {
      cand.assign(1, eos);
    } else if (!cand.empty() && cand.back() == eos) {
      cand.pop_back();
    }
  }

  if (uniform == nullptr) return argmax_of(cr, cand);

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

}  // namespace

void cfg_sample(const float* cond, const float* uncond, int64_t B, int64_t C, int64_t V, int64_t cond_sb,
                int64_t cond_sc, int64_t uncond_sb, int64_t uncond_sc, const float* uniforms, int64_t* out,
                const SampleParams& params) {
  const int64_t rows = B * C;
#if defined(DIA_FAST_OPENMP)
#pragma omp parallel if (rows * V >= kParallelMinElements)
#endif
  {
    Scratch scratch;
#if defined(DIA_FAST_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / C;
      const int64_t c = r - b * C;
      out[r] = sample_row(cond + b * cond_sb + c * cond_sc, uncond + b * uncond_sb + c * uncond_sc, V, c,
                          uniforms == nullptr ? nullptr : uniforms + r, params, scratch);
    }
  }
}

}  // namespace dia_fast
