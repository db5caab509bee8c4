// One CFG sampling step for Apple GPUs: dia_fast.ops.reference.cfg_sample on float32 logits,
// one threadgroup of DIA_SAMPLE_GROUP threads per row (b, c). CFG guidance, top-k on the guided
// logits (exactly k ids survive; among tied values the lowest ids, like a stable sort), Dia's
// EOS rules on the COND logits, then greedy argmax, or temperature + top-p + an inverse-CDF draw
// in ascending id order driven by one uniform per row (drawn by torch on the device), as the
// C++ kernel does. V <= DIA_SAMPLE_MAX_VOCAB.
#include <metal_stdlib>
using namespace metal;

#ifndef DIA_SAMPLE_GROUP
#define DIA_SAMPLE_GROUP 256
#endif
#ifndef DIA_SAMPLE_MAX_VOCAB
#define DIA_SAMPLE_MAX_VOCAB 2048
#endif

// A filtered-out logit: -FLT_MAX rather than an infinity, since the library may be compiled with
// fast math (which assumes none); every real logit compares greater.
constant float kSampleMasked = -3.402823466e+38f;

// Monotone float -> uint map (larger float, larger key); -0.0 and +0.0 share a key.
static uint sample_key(float f) {
  const uint u = as_type<uint>(f == 0.0f ? 0.0f : f);
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}

static uint sample_count(threadgroup uint* red, uint v, uint tid) {
  red[tid] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = DIA_SAMPLE_GROUP / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const uint r = red[0];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return r;
}

// Index of the largest value (lowest index among ties; 0 when every value is masked).
static uint sample_argmax(threadgroup float* vals, threadgroup float* rv, threadgroup uint* ri, long V, uint tid) {
  float best = kSampleMasked;
  uint best_i = 0xFFFFFFFFu;
  for (long i = tid; i < V; i += DIA_SAMPLE_GROUP) {
    if (vals[i] > best) {  // strict: each thread walks ascending ids
      best = vals[i];
      best_i = uint(i);
    }
  }
  rv[tid] = best;
  ri[tid] = best_i;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = DIA_SAMPLE_GROUP / 2; s > 0; s >>= 1) {
    if (tid < s) {
      const float a = rv[tid], b = rv[tid + s];
      const uint ia = ri[tid], ib = ri[tid + s];
      if (b > a || (b == a && ib < ia)) {
        rv[tid] = b;
        ri[tid] = ib;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const uint r = ri[0] == 0xFFFFFFFFu ? 0u : ri[0];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return r;
}

// cond, uncond: [R, V] (rows (b, c), contiguous); uniforms: [R] in [0, 1) (read when greedy == 0);
// out: [R]. Dispatch: threads = R * DIA_SAMPLE_GROUP, group_size = DIA_SAMPLE_GROUP.
kernel void dia_cfg_sample_f32(device const float* cond [[buffer(0)]],
                               device const float* uncond [[buffer(1)]],
                               device const float* uniforms [[buffer(2)]],
                               device long* out [[buffer(3)]],
                               constant long& C [[buffer(4)]],
                               constant long& V [[buffer(5)]],
                               constant long& top_k [[buffer(6)]],
                               constant long& eos_id [[buffer(7)]],
                               constant long& greedy [[buffer(8)]],
                               constant float& cfg_scale [[buffer(9)]],
                               constant float& temperature [[buffer(10)]],
                               constant float& top_p [[buffer(11)]],
                               uint row [[threadgroup_position_in_grid]],
                               uint tid [[thread_position_in_threadgroup]]) {
  threadgroup uint keys[DIA_SAMPLE_MAX_VOCAB];  // guided keys, later candidate ids
  threadgroup float vals[DIA_SAMPLE_MAX_VOCAB];  // filtered COND logits, later weights
  threadgroup float rv[DIA_SAMPLE_GROUP];
  threadgroup uint ri[DIA_SAMPLE_GROUP];
  threadgroup uchar dropped[DIA_SAMPLE_MAX_VOCAB];  // candidate removed by top-p
  threadgroup uint n_cand;

  device const float* cr = cond + long(row) * V;
  device const float* ur = uncond + long(row) * V;
  const long channel = long(row) % C;
  const bool use_top_k = top_k > 0 && top_k < V;

  // 1. guided logits -> keys
  for (long i = tid; i < V; i += DIA_SAMPLE_GROUP) {
    const float diff = cr[i] - ur[i];
    keys[i] = sample_key(cr[i] + cfg_scale * diff);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 2. top-k: the k-th largest key, fixed bit by bit from the top (count of keys >= t is monotone)
  uint thr = 0;
  uint need = 0;  // how many ids whose key equals thr survive (the lowest ids)
  if (use_top_k) {
    for (int bit = 31; bit >= 0; --bit) {
      const uint t = thr | (1u << uint(bit));
      uint local = 0;
      for (long i = tid; i < V; i += DIA_SAMPLE_GROUP) local += keys[i] >= t ? 1u : 0u;
      if (long(sample_count(ri, local, tid)) >= top_k) thr = t;
    }
    uint local = 0;
    for (long i = tid; i < V; i += DIA_SAMPLE_GROUP) local += keys[i] > thr ? 1u : 0u;
    need = uint(top_k) - sample_count(ri, local, tid);
  }

  // 3. filtered COND logits: top-k, ids above EOS never, EOS only on channel 0
  const long last_allowed = channel == 0 ? eos_id : eos_id - 1;
  for (long i = tid; i < V; i += DIA_SAMPLE_GROUP) {
    bool keep = i <= last_allowed;
    if (use_top_k && keep) {
      const uint k = keys[i];
      if (k < thr) {
        keep = false;
      } else if (k == thr) {  // rare: rank among the ids that tie with the threshold
        uint rank = 0;
        for (long j = 0; j < i; ++j) rank += keys[j] == thr ? 1u : 0u;
        keep = rank < need;
      }
    }
    vals[i] = keep ? cr[i] : kSampleMasked;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (channel == 0) {  // EOS is the only candidate when it is the argmax, else it is masked
    const bool eos_max = long(sample_argmax(vals, rv, ri, V, tid)) == eos_id;
    for (long i = tid; i < V; i += DIA_SAMPLE_GROUP) {
      if (eos_max ? i != eos_id : i == eos_id) vals[i] = kSampleMasked;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const uint best = sample_argmax(vals, rv, ri, V, tid);
  if (greedy != 0) {
    if (tid == 0) out[row] = long(best);
    return;
  }

  // 4. sampling: compact the candidates (ascending ids) into keys[] / vals[] as weights
  const float max_x = vals[best] / temperature;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    uint n = 0;
    for (long i = 0; i < V; ++i) {
      if (vals[i] > kSampleMasked) {
        keys[n] = uint(i);
        vals[n] = precise::exp(vals[i] / temperature - max_x);  // n <= i: in-place is safe
        ++n;
      }
    }
    n_cand = n;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint n = n_cand;
  if (n == 0) {
    if (tid == 0) out[row] = long(best);
    return;
  }
  float local_total = 0.0f;
  for (uint j = tid; j < n; j += DIA_SAMPLE_GROUP) local_total += vals[j];
  rv[tid] = local_total;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = DIA_SAMPLE_GROUP / 2; s > 0; s >>= 1) {
    if (tid < s) rv[tid] += rv[tid + s];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const float total = rv[0];
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // top-p: a candidate survives while the mass ranked before it (larger weight, or equal weight
  // and lower id) is <= top_p * total.
  for (uint j = tid; j < n; j += DIA_SAMPLE_GROUP) {
    bool drop = false;
    if (top_p < 1.0f) {
      const float w = vals[j];
      float before = 0.0f;
      for (uint o = 0; o < n; ++o) before += (vals[o] > w || (vals[o] == w && o < j)) ? vals[o] : 0.0f;
      drop = before > top_p * total;
    }
    dropped[j] = drop ? 1 : 0;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    float kept = 0.0f;
    for (uint j = 0; j < n; ++j) kept += dropped[j] != 0 ? 0.0f : vals[j];
    const float target = uniforms[row] * kept;
    float acc = 0.0f;
    long chosen = long(keys[0]);
    for (uint j = 0; j < n; ++j) {
      if (dropped[j] != 0) continue;
      acc += vals[j];
      chosen = long(keys[j]);
      if (acc > target) break;
    }
    out[row] = chosen;
  }
}
