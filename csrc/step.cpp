// The bookkeeping of a decode step after the draw (dia_fast.ops.reference.step_update, and slot_update for
// continuous batching): Dia's end-of-speech countdown, the forced prefix, the output and the next decoder input,
// the completion flags. A few hundred integers, but about twenty PyTorch ops in the references: one call here.
#include <algorithm>
#include <cstdint>

#include "kernels.hpp"

namespace dia_fast {

namespace {

// the largest of n non-negative values (0 for none): the delay after which an item has finished
int64_t largest(const int64_t* values, int64_t n) {
  return n > 0 ? std::max<int64_t>(0, *std::max_element(values, values + n)) : 0;
}

}  // namespace

int64_t step_update(const StepUpdateArgs& a) {
  const int64_t p = a.pos[0];
  if (p < 0 || p >= a.L) return p < 0 ? 0 : p;  // (never -1: that means done)
  const int64_t max_delay = largest(a.delays, a.C);
  bool all_finished = true;
  for (int64_t b = 0; b < a.B; ++b) {
    int64_t* codes = a.codes_out + b * a.C;
    const int64_t* drawn = a.codes + b * a.C;
    const int64_t end_at = a.forced_eos_pos[a.n_forced_eos == 1 ? 0 : b];
    // channel 0's EOS (as drawn) or reaching the forced end starts the countdown
    if (a.eos_pos[b] < 0 && (drawn[0] == a.eos_value || p >= end_at)) a.eos_pos[b] = p;
    const bool counting = a.eos_pos[b] >= 0;
    const int64_t since = p - a.eos_pos[b];
    const int64_t* forced = a.forced + (b * a.L + p) * a.C;
    int64_t* out = a.out + (b * a.L + p) * a.C;
    for (int64_t c = 0; c < a.C; ++c) {
      int64_t v = drawn[c];
      if (counting && since == a.delays[c]) v = a.eos_value;
      if (counting && since > a.delays[c]) v = a.pad_value;
      if (forced[c] != kNotForced) v = forced[c];
      codes[c] = v;
      out[c] = v;
    }
    const bool finished = (counting && since >= max_delay) || !a.real[b];
    all_finished = all_finished && finished;
    if (a.min_eos_pos != nullptr) a.allow_eos[b] = p + 1 >= a.min_eos_pos[b];
  }
  a.done[0] = all_finished;
  for (int64_t r = 0; r < a.R; ++r) std::copy(a.codes_out + (r % a.B) * a.C, a.codes_out + (r % a.B + 1) * a.C, a.tokens + r * a.C);
  return -1;
}

void slot_update(const SlotUpdateArgs& a) {
  const int64_t max_delay = largest(a.delays, a.C);
  for (int64_t s = 0; s < a.S; ++s) {
    const bool live = a.active[s] && !a.finished[s];
    const int64_t p = std::min(std::max(a.pos[s], int64_t(0)), a.L - 1);
    const int64_t* drawn = a.codes + s * a.C;
    if (live && a.eos_pos[s] < 0 && (drawn[0] == a.eos_value || p >= a.forced_eos_pos[s])) a.eos_pos[s] = p;
    const bool counting = live && a.eos_pos[s] >= 0;
    const int64_t since = p - a.eos_pos[s];
    const int64_t* forced = a.forced + (s * a.L + p) * a.C;
    int64_t* out = a.out + (s * a.L + p) * a.C;
    int64_t* cond_row = a.tokens + 2 * s * a.C;  // rows 2s (conditional) and 2s + 1 (unconditional)
    for (int64_t c = 0; c < a.C; ++c) {
      int64_t v = drawn[c];
      if (counting && since == a.delays[c]) v = a.eos_value;
      if (counting && since > a.delays[c]) v = a.pad_value;
      if (forced[c] != kNotForced) v = forced[c];
      if (live) out[c] = v;
      cond_row[c] = v;
      cond_row[a.C + c] = v;
    }
    const bool done_now = live && a.eos_pos[s] >= 0 && since >= max_delay;
    a.finished[s] = a.finished[s] || done_now;
    a.row_pos[2 * s] = a.row_pos[2 * s + 1] = p;
    a.pos[s] = live && !done_now ? std::min(p + 1, a.L - 1) : p;
    a.allow_eos[s] = a.pos[s] >= a.min_eos_pos[s];
  }
}

}  // namespace dia_fast
