// Weight-only int8 linear: out[m, n] = scale[n] * sum_k x[m, k] * float(w[n, k]).
//
// A decode step multiplies a few activation rows (batch x 2 for CFG) by every weight once, so the
// weight bytes read set its speed: int8 weights read a quarter of fp32's. Widening every int8 weight
// to fp32 costs more instructions than the memory system leaves time for (measured: 9 G weights/s
// per core out of cache, vs 19 in cache), so each activation row is first rounded to 16-bit
// integers against its own max |x| (relative error <= 2^-16 of that max, far below the weights'
// int8 rounding), and the products are integer multiply-adds (pmaddwd: 32-bit sums of two
// int16 x int16 products) accumulated in int32, flushed to fp32 every kChunk columns so that
// no int32 sum can overflow. Activations are never rounded to 8 bits: this is weight-only int8.
//
// Each output is (integer sum * scale[n]) * the row's scale: the weight scale first, so that large activations
// (up to FLT_MAX) give the finite result of x @ (w * scale).T instead of overflowing in the unscaled sum.
//
// Blocks of up to kRowBlock rows of w x kMBlock rows of x share every weight load. The SIMD
// versions are compiled for their ISA with target attributes and chosen at run time
// (__builtin_cpu_supports), so the wheel needs no -march flag and runs on any x86-64; other
// compilers and CPUs use the portable loop, which computes the same integer sums.
//
// The SIMD blocks prefetch each row's weights one block ahead: the same row of the next block of
// rows, which under the static schedule is the thread's own next block (a prefetch past the end of
// the weights is harmless: prefetches never fault). Rows are short (2 KB at K = 2048), so prefetching
// a fixed distance ahead within a row left every block's first bytes cold; this measured 1.2x faster
// on 2 cores (the 13 GEMMs of a Dia-1.6B-width step, alternating runs).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "act_round.hpp"
#include "kernels.hpp"
#include "simd_x86.hpp"

namespace dia_fast {
namespace {

constexpr int kRowBlock = 8;  // rows of w per block (a thread's unit of work)
constexpr int kMBlock = 4;    // rows of x per block: 2 x 8 rows of w for M <= 2, else 4 x 4 (AVX-512 has 32 registers)
// columns per int32 accumulation: a lane sums at most 2048 / 8 pmaddwd results of up to 2 * 32767 * 128 each
constexpr int64_t kChunk = 2048;

struct LinearArgs {
  const int16_t* xq;  // [M, Kp] rounded activations, zero past K
  const float* xs;    // [M] their scales (0: a zero row)
  const float* unscale;  // [M] 1, or 2^-64 for tiny rows (act_round.hpp)
  int64_t M, K, Kp;
  const int8_t* w;
  const float* scale;
  int64_t N;
  float* out;
  int64_t ldo;
};

void block_portable(const LinearArgs& a, int64_t n0, int nb, int64_t m0, int mb) {
  for (int r = 0; r < nb; ++r) {
    const int8_t* wr = a.w + (n0 + r) * a.K;
    for (int i = 0; i < mb; ++i) {
      const int16_t* xr = a.xq + (m0 + i) * a.Kp;
      float acc = 0.0f;
      for (int64_t k0 = 0; k0 < a.K; k0 += kChunk) {
        int64_t part = 0;  // 2048 products of up to 2^22 each: more than int32 holds
        for (int64_t k = k0, end = std::min(a.K, k0 + kChunk); k < end; ++k) part += int32_t(xr[k]) * int32_t(wr[k]);
        acc += float(part);
      }
      a.out[(m0 + i) * a.ldo + n0 + r] = acc * a.scale[n0 + r] * a.xs[m0 + i] * a.unscale[m0 + i];
    }
  }
}

#if defined(DIA_FAST_X86_SIMD)

// The AVX-512 block, stamped out twice: with pmaddwd + paddd (AVX512BW), and with the one-instruction vpdpwssd
// (AVX512-VNNI). Both compute the same exact integer sums, so they give the same bits.
#define DIA_FAST_AVX512_BLOCK(NAME, TARGET, MADD_ADD)                                                               \
  template <int MB, int NB>                                                                                        \
  __attribute__((target(TARGET))) void NAME(const LinearArgs& a, int64_t n0, int64_t m0) {                         \
    __m512 accf[MB][NB];                                                                                           \
    for (int i = 0; i < MB; ++i)                                                                                   \
      for (int r = 0; r < NB; ++r) accf[i][r] = _mm512_setzero_ps();                                               \
    const int8_t* wr[NB];                                                                                          \
    for (int r = 0; r < NB; ++r) wr[r] = a.w + (n0 + r) * a.K;                                                     \
    const int64_t ahead = kRowBlock * a.K; /* the same row of the next block (prefetches never fault) */           \
    const int16_t* xr[MB];                                                                                         \
    for (int i = 0; i < MB; ++i) xr[i] = a.xq + (m0 + i) * a.Kp;                                                   \
    for (int64_t k0 = 0; k0 < a.K; k0 += kChunk) {                                                                 \
      const int64_t end = std::min(a.K, k0 + kChunk);                                                              \
      __m512i acc[MB][NB];                                                                                         \
      for (int i = 0; i < MB; ++i)                                                                                 \
        for (int r = 0; r < NB; ++r) acc[i][r] = _mm512_setzero_si512();                                           \
      for (int64_t k = k0; k < end; k += 32) {                                                                     \
        /* the ragged end: a masked load reads no weight past K (the rounded x is zero there) */                   \
        const __mmask32 mask = end - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << (end - k)) - 1); \
        if ((k & 63) == 0) {                                                                                       \
          for (int r = 0; r < NB; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + ahead + k), _MM_HINT_T0);  \
        }                                                                                                          \
        __m512i w16[NB];                                                                                           \
        for (int r = 0; r < NB; ++r) w16[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, wr[r] + k));     \
        for (int i = 0; i < MB; ++i) {                                                                             \
          const __m512i xv = _mm512_loadu_si512(xr[i] + k);                                                        \
          for (int r = 0; r < NB; ++r) acc[i][r] = MADD_ADD(acc[i][r], xv, w16[r]);                                \
        }                                                                                                          \
      }                                                                                                            \
      for (int i = 0; i < MB; ++i)                                                                                 \
        for (int r = 0; r < NB; ++r) accf[i][r] = _mm512_add_ps(accf[i][r], _mm512_cvtepi32_ps(acc[i][r]));       \
    }                                                                                                              \
    for (int i = 0; i < MB; ++i)                                                                                   \
      for (int r = 0; r < NB; ++r)                                                                                 \
        a.out[(m0 + i) * a.ldo + n0 + r] =                                                                         \
            _mm512_reduce_add_ps(accf[i][r]) * a.scale[n0 + r] * a.xs[m0 + i] * a.unscale[m0 + i];                \
  }

#define DIA_FAST_MADD_ADD(acc, x, w) _mm512_add_epi32(acc, _mm512_madd_epi16(x, w))
#define DIA_FAST_DPWSSD(acc, x, w) _mm512_dpwssd_epi32(acc, x, w)
DIA_FAST_AVX512_BLOCK(block_avx512, "avx512f,avx512bw,avx512vl", DIA_FAST_MADD_ADD)
DIA_FAST_AVX512_BLOCK(block_avx512vnni, "avx512f,avx512bw,avx512vl,avx512vnni", DIA_FAST_DPWSSD)
#undef DIA_FAST_MADD_ADD
#undef DIA_FAST_DPWSSD
#undef DIA_FAST_AVX512_BLOCK

template <int MB, int NB>
__attribute__((target("avx2,fma"))) void block_avx2(const LinearArgs& a, int64_t n0, int64_t m0) {
  __m256 accf[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < NB; ++r) accf[i][r] = _mm256_setzero_ps();
  const int8_t* wr[NB];
  for (int r = 0; r < NB; ++r) wr[r] = a.w + (n0 + r) * a.K;
  const int64_t ahead = kRowBlock * a.K;  // the same row of the next block (prefetches never fault)
  const int16_t* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = a.xq + (m0 + i) * a.Kp;
  int32_t tail[MB][NB] = {};
  for (int64_t k0 = 0; k0 < a.K; k0 += kChunk) {
    const int64_t end = std::min(a.K, k0 + kChunk);
    __m256i acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int r = 0; r < NB; ++r) acc[i][r] = _mm256_setzero_si256();
    int64_t k = k0;
    for (; k + 16 <= end; k += 16) {
      if ((k & 63) == 0) {
        for (int r = 0; r < NB; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + ahead + k), _MM_HINT_T0);
      }
      __m256i w16[NB];
      for (int r = 0; r < NB; ++r)
        w16[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k)));
      for (int i = 0; i < MB; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[i] + k));
        for (int r = 0; r < NB; ++r) acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_madd_epi16(xv, w16[r]));
      }
    }
    for (; k < end; ++k)  // the ragged end (only in the last chunk), element by element
      for (int i = 0; i < MB; ++i)
        for (int r = 0; r < NB; ++r) tail[i][r] += int32_t(xr[i][k]) * int32_t(wr[r][k]);
    for (int i = 0; i < MB; ++i)
      for (int r = 0; r < NB; ++r) accf[i][r] = _mm256_add_ps(accf[i][r], _mm256_cvtepi32_ps(acc[i][r]));
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < NB; ++r)
      a.out[(m0 + i) * a.ldo + n0 + r] =
          (hsum256(accf[i][r]) + float(tail[i][r])) * a.scale[n0 + r] * a.xs[m0 + i] * a.unscale[m0 + i];
}

using BlockFn = void (*)(const LinearArgs&, int64_t, int64_t);

template <int MB, int NB>
struct Avx512Block {
  static void run(const LinearArgs& a, int64_t n0, int64_t m0) { block_avx512<MB, NB>(a, n0, m0); }
};
template <int MB, int NB>
struct Avx512VnniBlock {
  static void run(const LinearArgs& a, int64_t n0, int64_t m0) { block_avx512vnni<MB, NB>(a, n0, m0); }
};
template <int MB, int NB>
struct Avx2Block {
  static void run(const LinearArgs& a, int64_t n0, int64_t m0) { block_avx2<MB, NB>(a, n0, m0); }
};

// kTable<an ISA's block>[mb - 1][nb - 1]
template <template <int, int> class B>
constexpr BlockFn kTable[kMBlock][kRowBlock] = {
    {B<1, 1>::run, B<1, 2>::run, B<1, 3>::run, B<1, 4>::run, B<1, 5>::run, B<1, 6>::run, B<1, 7>::run, B<1, 8>::run},
    {B<2, 1>::run, B<2, 2>::run, B<2, 3>::run, B<2, 4>::run, B<2, 5>::run, B<2, 6>::run, B<2, 7>::run, B<2, 8>::run},
    {B<3, 1>::run, B<3, 2>::run, B<3, 3>::run, B<3, 4>::run, nullptr, nullptr, nullptr, nullptr},
    {B<4, 1>::run, B<4, 2>::run, B<4, 3>::run, B<4, 4>::run, nullptr, nullptr, nullptr, nullptr},
};

#endif  // DIA_FAST_X86_SIMD

}  // namespace

int int8_linear_best_isa() {
#if defined(DIA_FAST_X86_SIMD)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return __builtin_cpu_supports("avx512vnni") ? kIsaAvx512Vnni : kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kIsaAvx2;
#endif
  return kIsaPortable;
}

void int8_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w, const float* scale, int64_t N,
                 float* out, int64_t ldo, int isa) {
  // Round each row of x to int16 against its max |x|. Rows that are zero, or hold NaN or inf,
  // get scale 0 here and are computed in fp32 below (so that NaN and inf propagate as in fp32).
  const RoundedRows rr = round_rows(x, M, K, ldx, 32);
  const std::vector<int64_t>& special = rr.special;
  const LinearArgs a{rr.xq.data(), rr.xs.data(), rr.unscale.data(), M, K, rr.Kp, w, scale, N, out, ldo};
  const int64_t row_blocks = (N + kRowBlock - 1) / kRowBlock;
  // Split the rows of w over the threads (each streams its own contiguous part of the weights).
#pragma omp parallel for schedule(static) if (N * K >= kParallelMinElements)
  for (int64_t b = 0; b < row_blocks; ++b) {
    const int64_t n0 = b * kRowBlock;
    const int nb = int(std::min<int64_t>(kRowBlock, N - n0));
#if defined(DIA_FAST_X86_SIMD)
    if (isa >= kIsaAvx512 && M > 2) {  // 4 rows of x x 4 rows of w: each weight converted once per 4 rows of x
      const auto& table = isa == kIsaAvx512Vnni ? kTable<Avx512VnniBlock> : kTable<Avx512Block>;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = int(std::min<int64_t>(4, M - m0));
        for (int half = 0; half < nb; half += 4) table[mb - 1][std::min(4, nb - half) - 1](a, n0 + half, m0);
      }
      continue;
    }
#endif
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
      const int mb = int(std::min<int64_t>(2, M - m0));
#if defined(DIA_FAST_X86_SIMD)
      if (isa == kIsaAvx512Vnni) {
        kTable<Avx512VnniBlock>[mb - 1][nb - 1](a, n0, m0);
        continue;
      }
      if (isa == kIsaAvx512) {
        kTable<Avx512Block>[mb - 1][nb - 1](a, n0, m0);
        continue;
      }
      if (isa == kIsaAvx2) {
        kTable<Avx2Block>[mb - 1][nb - 1](a, n0, m0);
        continue;
      }
#endif
      block_portable(a, n0, nb, m0, mb);
    }
  }
  for (const int64_t m : special) {  // NaN or inf in x: plain fp32 products
    const float* xr = x + m * ldx;
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * float(w[n * K + k]);
      out[m * ldo + n] = acc * scale[n];
    }
  }
}

}  // namespace dia_fast
