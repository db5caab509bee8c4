// Weight-only int4 linear with a scale per group of columns:
//   out[m, n] = sum_g scale[n, g] * sum_{k in group g} x[m, k] * w[n, k],  w in [-7, 7].
//
// Half the bytes of int8 per weight (plus one fp32 scale per `group` weights), for the same reason int8 exists: a
// decode step reads every weight once, so bytes set its speed. The activations are rounded per row to int16 as
// for int8 (act_round.hpp), so each group's sum is an exact integer dot product (pmaddwd / vpdpwssd), scaled and
// added in fp32 once per group, or once per kChunk columns of larger groups (so that no int32 sum can overflow).
// The row's scale comes last, so large activations (up to FLT_MAX) give the finite result of x @ W.T.
//
// Packing (ops.reference.pack_int4 defines it): a row of K weights is stored as K / 2 bytes in blocks of 64
// columns; byte j of block b holds w[64b + j] + 8 in its low nibble and w[64b + 32 + j] + 8 in its high nibble.
// So one 32-byte load gives two runs of 32 consecutive columns (low and high nibbles), which line up with two
// contiguous loads of the rounded activations. K and the group are multiples of 64 (the caller checks).
// The weights are prefetched one block of rows ahead, as in linear.cpp (measured 1.35x here: int4 rows
// are half as long, so more of each started cold before).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "act_round.hpp"
#include "kernels.hpp"
#include "simd_x86.hpp"

namespace dia_fast {
namespace {

constexpr int kRowBlock = 4;  // rows of w per block (a thread's unit of work)
constexpr int kMBlock = 2;    // rows of x per block
// columns per int32 sum (a multiple of 64): at most 8192 products of |x| <= 32767 and |w| <= 8, 2147418112 < 2^31
// (a SIMD lane sums 8 or 16 times fewer). Groups are 64-256 columns in practice: one chunk.
constexpr int64_t kChunk = 8192;

struct Int4Args {
  const int16_t* xq;  // [M, K] rounded activations
  const float* xs;    // [M] their scales (0: a zero row)
  const float* unscale;  // [M] 1, or 2^-64 for tiny rows (act_round.hpp)
  int64_t M, K;
  const uint8_t* w;  // [N, K / 2] packed
  const float* scale;  // [N, K / group]
  int64_t group, N;
  float* out;
  int64_t ldo;
};

inline int weight_at(const uint8_t* row, int64_t k) {
  const uint8_t byte = row[(k / 64) * 32 + (k % 32)];
  return ((k % 64) < 32 ? (byte & 0xF) : (byte >> 4)) - 8;
}

void block_portable(const Int4Args& a, int64_t n0, int nb, int64_t m0, int mb) {
  const int64_t groups = a.K / a.group;
  for (int r = 0; r < nb; ++r) {
    const uint8_t* wr = a.w + (n0 + r) * (a.K / 2);
    const float* sr = a.scale + (n0 + r) * groups;
    for (int i = 0; i < mb; ++i) {
      const int16_t* xr = a.xq + (m0 + i) * a.K;
      float acc = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t k0 = g * a.group, end = k0 + a.group; k0 < end; k0 += kChunk) {
          int32_t part = 0;  // at most kChunk products: fits (see kChunk)
          const int64_t kend = std::min(end, k0 + kChunk);
          for (int64_t k = k0; k < kend; ++k) part += int32_t(xr[k]) * weight_at(wr, k);
          acc += float(part) * sr[g];
        }
      }
      a.out[(m0 + i) * a.ldo + n0 + r] = acc * a.xs[m0 + i] * a.unscale[m0 + i];
    }
  }
}

#if defined(DIA_FAST_X86_SIMD)

// The AVX-512 block, with pmaddwd + paddd (AVX512BW) or vpdpwssd (AVX512-VNNI): the same exact integer sums.
#define DIA_FAST_INT4_AVX512_BLOCK(NAME, TARGET, MADD_ADD)                                                         \
  template <int MB, int NB>                                                                                        \
  __attribute__((target(TARGET))) void NAME(const Int4Args& a, int64_t n0, int64_t m0) {                           \
    const int64_t groups = a.K / a.group;                                                                          \
    __m512 accf[MB][NB];                                                                                           \
    for (int i = 0; i < MB; ++i)                                                                                   \
      for (int r = 0; r < NB; ++r) accf[i][r] = _mm512_setzero_ps();                                               \
    const uint8_t* wr[NB];                                                                                         \
    for (int r = 0; r < NB; ++r) wr[r] = a.w + (n0 + r) * (a.K / 2);                                               \
    const int64_t ahead = kRowBlock * (a.K / 2); /* the same row of the next block (prefetches never fault) */      \
    const int16_t* xr[MB];                                                                                         \
    for (int i = 0; i < MB; ++i) xr[i] = a.xq + (m0 + i) * a.K;                                                    \
    const __m512i low = _mm512_set1_epi16(0xF), eight = _mm512_set1_epi16(8);                                      \
    for (int64_t g = 0; g < groups; ++g)                                                                           \
    for (int64_t k0 = g * a.group, gend = k0 + a.group; k0 < gend; k0 += kChunk) { /* int32 sums per chunk */      \
      __m512i acc[MB][NB];                                                                                         \
      for (int i = 0; i < MB; ++i)                                                                                 \
        for (int r = 0; r < NB; ++r) acc[i][r] = _mm512_setzero_si512();                                           \
      for (int64_t k = k0, kend = std::min(gend, k0 + kChunk); k < kend; k += 64) {                               \
        if ((k & 127) == 0) {                                                                                      \
          for (int r = 0; r < NB; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + ahead + k / 2), _MM_HINT_T0);     \
        }                                                                                                          \
        __m512i lo[NB], hi[NB];                                                                                    \
        for (int r = 0; r < NB; ++r) {                                                                             \
          const __m512i v =                                                                                        \
              _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r] + k / 2)));           \
          lo[r] = _mm512_sub_epi16(_mm512_and_si512(v, low), eight);                                               \
          hi[r] = _mm512_sub_epi16(_mm512_srli_epi16(v, 4), eight);                                                \
        }                                                                                                          \
        for (int i = 0; i < MB; ++i) {                                                                             \
          const __m512i x0 = _mm512_loadu_si512(xr[i] + k), x1 = _mm512_loadu_si512(xr[i] + k + 32);              \
          for (int r = 0; r < NB; ++r) acc[i][r] = MADD_ADD(MADD_ADD(acc[i][r], x0, lo[r]), x1, hi[r]);            \
        }                                                                                                          \
      }                                                                                                            \
      for (int r = 0; r < NB; ++r) {                                                                               \
        const __m512 s = _mm512_set1_ps(a.scale[(n0 + r) * groups + g]);                                           \
        for (int i = 0; i < MB; ++i) accf[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][r]), s, accf[i][r]);  \
      }                                                                                                            \
    }                                                                                                              \
    for (int i = 0; i < MB; ++i)                                                                                   \
      for (int r = 0; r < NB; ++r)                                                                                 \
        a.out[(m0 + i) * a.ldo + n0 + r] = _mm512_reduce_add_ps(accf[i][r]) * a.xs[m0 + i] * a.unscale[m0 + i];  \
  }

#define DIA_FAST_MADD_ADD(acc, x, w) _mm512_add_epi32(acc, _mm512_madd_epi16(x, w))
#define DIA_FAST_DPWSSD(acc, x, w) _mm512_dpwssd_epi32(acc, x, w)
DIA_FAST_INT4_AVX512_BLOCK(block_avx512, "avx512f,avx512bw,avx512vl", DIA_FAST_MADD_ADD)
DIA_FAST_INT4_AVX512_BLOCK(block_avx512vnni, "avx512f,avx512bw,avx512vl,avx512vnni", DIA_FAST_DPWSSD)
#undef DIA_FAST_MADD_ADD
#undef DIA_FAST_DPWSSD
#undef DIA_FAST_INT4_AVX512_BLOCK

template <int MB, int NB>
__attribute__((target("avx2,fma"))) void block_avx2(const Int4Args& a, int64_t n0, int64_t m0) {
  const int64_t groups = a.K / a.group;
  __m256 accf[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < NB; ++r) accf[i][r] = _mm256_setzero_ps();
  const uint8_t* wr[NB];
  for (int r = 0; r < NB; ++r) wr[r] = a.w + (n0 + r) * (a.K / 2);
  const int64_t ahead = kRowBlock * (a.K / 2);  // the same row of the next block (prefetches never fault)
  const int16_t* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = a.xq + (m0 + i) * a.K;
  const __m256i low = _mm256_set1_epi16(0xF), eight = _mm256_set1_epi16(8);
  for (int64_t g = 0; g < groups; ++g)
  for (int64_t k0 = g * a.group, gend = k0 + a.group; k0 < gend; k0 += kChunk) {  // int32 sums per chunk
    __m256i acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int r = 0; r < NB; ++r) acc[i][r] = _mm256_setzero_si256();
    for (int64_t k = k0, kend = std::min(gend, k0 + kChunk); k < kend; k += 64) {
      if ((k & 127) == 0) {
        for (int r = 0; r < NB; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + ahead + k / 2), _MM_HINT_T0);
      }
      for (int j = 0; j < 32; j += 16) {  // bytes j..j+15: columns k+j.. (low nibbles) and k+32+j.. (high)
        __m256i lo[NB], hi[NB];
        for (int r = 0; r < NB; ++r) {
          const __m256i v =
              _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k / 2 + j)));
          lo[r] = _mm256_sub_epi16(_mm256_and_si256(v, low), eight);
          hi[r] = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), eight);
        }
        for (int i = 0; i < MB; ++i) {
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[i] + k + j));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[i] + k + 32 + j));
          for (int r = 0; r < NB; ++r)
            acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_add_epi32(_mm256_madd_epi16(x0, lo[r]),
                                                                     _mm256_madd_epi16(x1, hi[r])));
        }
      }
    }
    for (int r = 0; r < NB; ++r) {
      const __m256 s = _mm256_set1_ps(a.scale[(n0 + r) * groups + g]);
      for (int i = 0; i < MB; ++i) accf[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][r]), s, accf[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < NB; ++r)
      a.out[(m0 + i) * a.ldo + n0 + r] = hsum256(accf[i][r]) * a.xs[m0 + i] * a.unscale[m0 + i];
}

using BlockFn = void (*)(const Int4Args&, int64_t, int64_t);

template <int MB, int NB>
struct Avx512Block {
  static void run(const Int4Args& a, int64_t n0, int64_t m0) { block_avx512<MB, NB>(a, n0, m0); }
};
template <int MB, int NB>
struct Avx512VnniBlock {
  static void run(const Int4Args& a, int64_t n0, int64_t m0) { block_avx512vnni<MB, NB>(a, n0, m0); }
};
template <int MB, int NB>
struct Avx2Block {
  static void run(const Int4Args& a, int64_t n0, int64_t m0) { block_avx2<MB, NB>(a, n0, m0); }
};

// kTable<an ISA's block>[mb - 1][nb - 1]
template <template <int, int> class B>
constexpr BlockFn kTable[kMBlock][kRowBlock] = {
    {B<1, 1>::run, B<1, 2>::run, B<1, 3>::run, B<1, 4>::run},
    {B<2, 1>::run, B<2, 2>::run, B<2, 3>::run, B<2, 4>::run},
};

#endif  // DIA_FAST_X86_SIMD

}  // namespace

void int4_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, const float* scale,
                 int64_t group, int64_t N, float* out, int64_t ldo, int isa) {
  const RoundedRows rr = round_rows(x, M, K, ldx, 64);  // K is a multiple of 64: Kp == K
  const Int4Args a{rr.xq.data(), rr.xs.data(), rr.unscale.data(), M, K, w, scale, group, N, out, ldo};
  const int64_t row_blocks = (N + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static) if (N * K >= kParallelMinElements)
  for (int64_t b = 0; b < row_blocks; ++b) {
    const int64_t n0 = b * kRowBlock;
    const int nb = int(std::min<int64_t>(kRowBlock, N - n0));
    for (int64_t m0 = 0; m0 < M; m0 += kMBlock) {
      const int mb = int(std::min<int64_t>(kMBlock, M - m0));
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
  const int64_t groups = K / group;
  for (const int64_t m : rr.special) {  // NaN or inf in x: plain fp32 products
    const float* xr = x + m * ldx;
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* wr = w + n * (K / 2);
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * float(weight_at(wr, k)) * scale[n * groups + k / group];
      out[m * ldo + n] = acc;
    }
  }
}

}  // namespace dia_fast
