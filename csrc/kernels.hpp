// dia_fast native CPU kernels: plain C++ on raw buffers (no Python, no libtorch).
// The Python-facing checks (dtypes, shapes, aliasing) live in module.cpp; these functions
// trust their arguments.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dia_fast {

// Marks a hot function to be compiled for AVX-512 and AVX2 as well as baseline x86-64 (the wheel has no -march
// flag), the best chosen when the library loads (GCC's function multiversioning, x86-64 Linux; elsewhere one
// baseline build). -ffp-contract=off holds in every clone: no FMA contraction, the same rounding as the baseline.
// Calls into a clone go through a resolved pointer: mark a unit of work (a row, a head), not a tiny helper.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DIA_FAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DIA_FAST_CLONES
#endif

// Element count above which a kernel spreads over OpenMP threads (below it, waking threads
// costs more than the work on a small shared CPU).
constexpr int64_t kParallelMinElements = int64_t(1) << 20;

// out[b, t, c] = codes[b, t - d_c, c]; bos where t - d_c < 0; pad where t - d_c >= T.
// codes, out: C-contiguous [B, T, C]. Instantiated for int32_t and int64_t.
template <typename T>
void apply_delay(const T* codes, T* out, int64_t B, int64_t Tn, int64_t C, const int64_t* delays, T bos, T pad);

// out[b, t, c] = codes[b, min(t + d_c, T - 1), c]. codes, out: C-contiguous [B, T, C].
template <typename T>
void revert_delay(const T* codes, T* out, int64_t B, int64_t Tn, int64_t C, const int64_t* delays);

// out[b, t, c] = v = codes[b, min(t + d_c, T - 1), c] for t < T_out = max(T - max(d), 0), with
// v -> 0 where v is outside [0, codebook_size). out: C-contiguous int64 [B, T_out, C].
template <typename T>
void undelay_codes(const T* codes, int64_t* out, int64_t B, int64_t Tn, int64_t C, const int64_t* delays,
                   int64_t codebook_size);

struct SampleParams {
  float cfg_scale = 3.0f;
  float temperature = 1.2f;
  float top_p = 0.95f;
  int64_t top_k = 45;  // <= 0 or >= V: no top-k filter
  int64_t eos_id = 1024;
};

// One CFG sampling step over B x C rows of V logits (last dim contiguous; row (b, c) of `cond`
// starts at cond + b * cond_sb + c * cond_sc, same for `uncond`).
// uniforms == nullptr: greedy; else uniforms[b * C + c] in [0, 1) drives an inverse-CDF draw
// over the filtered distribution, walked in ascending token id order.
void cfg_sample(const float* cond, const float* uncond, int64_t B, int64_t C, int64_t V, int64_t cond_sb,
                int64_t cond_sc, int64_t uncond_sb, int64_t uncond_sc, const float* uniforms, int64_t* out,
                const SampleParams& params);

// Per-row settings of a seeded CFG sampling step (one entry per batch item b, shared by its C channels).
struct RowSampleParams {
  const float* cfg_scale = nullptr;    // [B]
  const float* temperature = nullptr;  // [B]; 0: greedy
  const float* top_p = nullptr;        // [B]; >= 1: no nucleus filter
  const int64_t* top_k = nullptr;      // [B]; <= 0: no CFG filter (the guided logits are sampled); >= V: all kept
  const uint64_t* seed = nullptr;      // [B] Philox keys
  const int64_t* offset = nullptr;     // [B] Philox counter offsets (the decode position)
  const uint8_t* allow_eos = nullptr;  // [B] or nullptr; 0: the row may not emit EOS
  int64_t eos_id = 1024;
};

// The seeded CFG sampling step of dia_fast.ops.reference.cfg_sample (seed=...): per-row settings, the CFG
// filter (or the guided logits without one), Dia's EOS rules, then argmax, or temperature, top-p and the
// Gumbel-max draw argmax(z + g) with g from Philox4x32-10 keyed by seed[b] at counter
// (id, channel, offset[b] low word, offset[b] high word), ties to the lowest id.
void cfg_sample_rows(const float* cond, const float* uncond, int64_t B, int64_t C, int64_t V, int64_t cond_sb,
                     int64_t cond_sc, int64_t uncond_sb, int64_t uncond_sc, int64_t* out, const RowSampleParams& p);

// The first 32-bit word of Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
inline uint32_t philox4x32_first(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int i = 0; i < 10; ++i) {
    if (i) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n1 = uint32_t(p1);
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1, n3 = uint32_t(p0);
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
  }
  return c0;
}

// dst[i] = clip(rint(src[i] * 32767 + dither_i), -32768, 32767); NaN -> 0. Rounding is half to
// even (like np.rint). dither_i = (u(2i) + u(2i + 1)) with u(n) the n-th output of a SplitMix64
// stream seeded with `seed`, mapped to [-0.5, 0.5): (z >> 40) * 2^-24 - 0.5 (TPDF, +-1 LSB).
void float_to_pcm16(const float* src, int16_t* dst, int64_t n, bool dither, uint64_t seed);

// SplitMix64: the n-th (0-based) output of the stream seeded with `seed`.
inline uint64_t splitmix64_at(uint64_t seed, uint64_t n) {
  uint64_t z = seed + (n + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Weight-only int8 linear: out[m, n] = scale[n] * sum_k x[m, k] * float(w[n, k]) for m < M, n < N.
// x: fp32 rows of K with row stride ldx; w: int8 [N, K] C-contiguous; scale: fp32 [N]; out: fp32 rows of N
// with row stride ldo. isa: one of kIsa* that int8_linear_best_isa() allows (the caller checks).
constexpr int kIsaPortable = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAvx512Vnni = 3;
int int8_linear_best_isa();
void int8_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w, const float* scale, int64_t N,
                 float* out, int64_t ldo, int isa);

// Weight-only int4 linear, a scale per group of columns: out[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] *
// w[n, k] with w in [-7, 7] packed two per byte (csrc/linear_int4.cpp: the layout), [N, K / 2]; scale fp32
// [N, K / group]. K and group are multiples of 64, group divides K (the caller checks). isa as for int8_linear.
void int4_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, const float* scale,
                 int64_t group, int64_t N, float* out, int64_t ldo, int isa);

// Residual add + RMSNorm over `rows` rows of D floats: h = residual + delta (written to h_out; delta == nullptr:
// h = residual, h_out unused), normed = h * (1 / sqrt(mean(h^2) + eps)) * weight. All C-contiguous.
void add_rmsnorm(const float* residual, const float* delta, const float* weight, float eps, int64_t rows, int64_t D,
                 float* normed, float* h_out);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, H + i] for `rows` rows of [gate | up] (2H floats).
void swiglu(const float* gate_up, int64_t rows, int64_t H, float* out);

// out[r] = sum_c table[c * vocab + codes[r, c]] (rows of D floats) for codes [rows, C]. Returns -1, or the flat
// index of the first code outside [0, vocab) (then nothing is written).
int64_t embed_codes(const int64_t* codes, int64_t rows, int64_t C, const float* table, int64_t vocab, int64_t D,
                    float* out);

// RoPE on the q and k heads of a fused projection qkv [R, T, (Hq + 2 Hkv) D] at positions start + t, rotated k
// and v written into caches [R, Hkv, L, D] (strides cache_sr, cache_sh in elements; [L, D] contiguous), rotated
// q into q_out [R, Hq, T, D]. start: n_start = 0 (all rows at 0), 1 (shared) or R values. cos, sin: [P, D / 2].
struct RopeKvArgs {
  const float* qkv;
  int64_t R, T, Hq, Hkv, D;
  const int64_t* start;
  int64_t n_start;
  const float* cos;
  const float* sin;
  int64_t P;
  float* k_cache;
  float* v_cache;
  int64_t cache_sr, cache_sh, L;
  float* q_out;
};
// Returns -1, or the first row whose positions fall outside [0, min(L, P)) (then nothing is written).
int64_t rope_kv_write(const RopeKvArgs& args);

// One query step of attention: q [B, Hq, D] (query head h reads KV head h / (Hq / Hkv)) against caches k, v
// [B, Hkv, L, D] (strides k_sb, k_sh, v_sb, v_sh in elements; [L, D] contiguous); keys t < kv_len (n_len = 0:
// all L; 1: one length for every row; B: per row) with key_mask[b * mask_sb + t] != 0 (nullptr: all). A head
// that attends no key, or meets a NaN or +inf score, outputs zeros. out: [B, Hq, D].
constexpr int64_t kAttentionParallelFloats = int64_t(1) << 16;  // K/V floats read above which attention is threaded
constexpr int64_t kMaxGroup = 64;  // query heads per KV head that decode_attention takes
struct DecodeAttentionArgs {
  const float* q;
  int64_t B, Hq, D;
  const float* k;
  const float* v;
  int64_t Hkv, L, k_sb, k_sh, v_sb, v_sh;
  const int64_t* kv_len;
  int64_t n_len;
  const uint8_t* key_mask;
  int64_t mask_sb;
  float scale;
  float* out;
};
void decode_attention(const DecodeAttentionArgs& args);

// dia_fast.ops.reference.step_update for int64 codes: codes [B, C] drawn at position p = pos[0] (the codes after the
// countdown and the forced prefix go to codes_out [B, C], out[:, p] [B, L, C] and tokens [R, C], row r taking item
// r % B), eos_pos [B] updated, done[0] = every item finished (or not real), allow_eos[b] = p + 1 >= min_eos_pos[b]
// when min_eos_pos is given. forced_eos_pos: 1 (shared) or B values. Returns -1, or a non-negative value when p is
// outside [0, L) (nothing written).
constexpr int64_t kNotForced = -1;
struct StepUpdateArgs {
  const int64_t* codes;
  int64_t* codes_out;
  int64_t B, C, L, R;
  const int64_t* pos;
  int64_t* eos_pos;
  const int64_t* delays;
  const int64_t* forced_eos_pos;
  int64_t n_forced_eos;
  const int64_t* forced;
  int64_t* out;
  const bool* real;
  bool* done;
  int64_t* tokens;
  const int64_t* min_eos_pos;
  bool* allow_eos;
  int64_t eos_value, pad_value;
};
int64_t step_update(const StepUpdateArgs& args);

// dia_fast.ops.reference.slot_update: per slot s (S slots of L positions, its rows 2s and 2s + 1), at its own position
// pos[s] (clamped to [0, L)), for live slots (active and not finished) the countdown, the forced prefix and the
// codes into out[s, p]; finished, pos and allow_eos updated; every slot's codes into tokens [2S, C] and its
// position into row_pos [2S]. L >= 1.
struct SlotUpdateArgs {
  const int64_t* codes;
  int64_t S, C, L;
  int64_t* pos;
  int64_t* eos_pos;
  const int64_t* delays;
  const int64_t* forced_eos_pos;
  const int64_t* min_eos_pos;
  const int64_t* forced;
  int64_t* out;
  const bool* active;
  bool* finished;
  bool* allow_eos;
  int64_t* tokens;
  int64_t* row_pos;
  int64_t eos_value, pad_value;
};
void slot_update(const SlotUpdateArgs& args);

}  // namespace dia_fast
