// Delay-pattern kernels on [B, T, C] code arrays (see kernels.hpp for the exact semantics).
#include <algorithm>

#include "kernels.hpp"

namespace dia_fast {

// Calls row(t, src, dst) for each of the B * t_out output rows: src is batch item b's [Tn, C] input,
// dst the row's C outputs. Parallel for large arrays.
template <typename Src, typename Dst, typename Row>
void for_each_row(const Src* codes, Dst* out, int64_t B, int64_t Tn, int64_t t_out, int64_t C, Row row) {
  const int64_t rows = B * t_out;
#if defined(DIA_FAST_OPENMP)
#pragma omp parallel for schedule(static) if (rows * C >= kParallelMinElements)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / t_out;
    row(r - b * t_out, codes + b * Tn * C, out + r * C);
  }
}

template <typename T>
void apply_delay(const T* codes, T* out, int64_t B, int64_t Tn, int64_t C, const int64_t* delays, T bos, T pad) {
  for_each_row(codes, out, B, Tn, Tn, C, [=](int64_t t, const T* src, T* dst) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t s = t - delays[c];
      dst[c] = s < 0 ? bos : (s >= Tn ? pad : src[s * C + c]);
    }
  });
}

template <typename T>
void revert_delay(const T* codes, T* out, int64_t B, int64_t Tn, int64_t C, const int64_t* delays) {
  const int64_t last = Tn - 1;
  for_each_row(codes, out, B, Tn, Tn, C, [=](int64_t t, const T* src, T* dst) {
    for (int64_t c = 0; c < C; ++c) dst[c] = src[std::min(t + delays[c], last) * C + c];
  });
}

template <typename T>
void undelay_codes(const T* codes, int64_t* out, int64_t B, int64_t Tn, int64_t C, const int64_t* delays,
                   int64_t codebook_size) {
  int64_t max_delay = 0;
  for (int64_t c = 0; c < C; ++c) max_delay = std::max(max_delay, delays[c]);
  const int64_t last = Tn - 1;
  for_each_row(codes, out, B, Tn, std::max<int64_t>(Tn - max_delay, 0), C,
               [=](int64_t t, const T* src, int64_t* dst) {
                 for (int64_t c = 0; c < C; ++c) {
                   const int64_t v = static_cast<int64_t>(src[std::min(t + delays[c], last) * C + c]);
                   dst[c] = (v < 0 || v >= codebook_size) ? 0 : v;
                 }
               });
}

#define DIA_FAST_INSTANTIATE(T)                                                                          \
  template void apply_delay<T>(const T*, T*, int64_t, int64_t, int64_t, const int64_t*, T, T);        \
  template void revert_delay<T>(const T*, T*, int64_t, int64_t, int64_t, const int64_t*);             \
  template void undelay_codes<T>(const T*, int64_t*, int64_t, int64_t, int64_t, const int64_t*, int64_t);

DIA_FAST_INSTANTIATE(int32_t)
DIA_FAST_INSTANTIATE(int64_t)

#undef DIA_FAST_INSTANTIATE

}  // namespace dia_fast
