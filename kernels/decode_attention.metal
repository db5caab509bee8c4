// One decode step of attention over a KV cache, f16 in and out, f32 arithmetic (Apple GPUs).
// Semantics: dia_fast.ops.reference.decode_attention with the key mask (kv_len and key_mask
// combined on the Python side) as a uchar [B, L] buffer. One threadgroup of DIA_ATTN_GROUP
// threads per (batch, query head); keys are scored DIA_ATTN_CHUNK at a time into threadgroup
// memory with an online softmax across chunks, so any cache length works. GQA: query head h
// reads KV head h / (Hq / Hkv). A query that sees no key returns zeros.
#include <metal_stdlib>
using namespace metal;

#ifndef DIA_ATTN_GROUP
#define DIA_ATTN_GROUP 256
#endif
#ifndef DIA_ATTN_CHUNK
#define DIA_ATTN_CHUNK 1024
#endif
#ifndef DIA_ATTN_MAX_DIM
#define DIA_ATTN_MAX_DIM 256
#endif

// Score of a masked key. A large finite value rather than an infinity: the library may be
// compiled with fast math, which assumes none. exp(kAttnMasked - m) is exactly 0 for real scores.
constant float kAttnMasked = -1.0e30f;

static float attn_reduce_max(threadgroup float* red, float v, uint tid) {
  red[tid] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = DIA_ATTN_GROUP / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] = max(red[tid], red[tid + s]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const float r = red[0];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return r;
}

static float attn_reduce_sum(threadgroup float* red, float v, uint tid) {
  red[tid] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = DIA_ATTN_GROUP / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const float r = red[0];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return r;
}

// q, out: [B, Hq, D]; k_cache, v_cache: [B, Hkv, L, D]; mask: [B, L] (1 = attend). D <= 256.
// Dispatch: threads = B * Hq * DIA_ATTN_GROUP, group_size = DIA_ATTN_GROUP.
kernel void dia_decode_attention_f16(device const half* q [[buffer(0)]],
                                     device const half* k_cache [[buffer(1)]],
                                     device const half* v_cache [[buffer(2)]],
                                     device const uchar* mask [[buffer(3)]],
                                     device half* out [[buffer(4)]],
                                     constant long& Hq [[buffer(5)]],
                                     constant long& Hkv [[buffer(6)]],
                                     constant long& L [[buffer(7)]],
                                     constant long& D [[buffer(8)]],
                                     constant float& scale [[buffer(9)]],
                                     uint group [[threadgroup_position_in_grid]],
                                     uint tid [[thread_position_in_threadgroup]]) {
  threadgroup float qs[DIA_ATTN_MAX_DIM];
  threadgroup float scores[DIA_ATTN_CHUNK];
  threadgroup float red[DIA_ATTN_GROUP];

  const long b = long(group) / Hq;
  const long h = long(group) % Hq;
  const long kvh = h / (Hq / Hkv);
  device const half* kp = k_cache + (b * Hkv + kvh) * L * D;
  device const half* vp = v_cache + (b * Hkv + kvh) * L * D;
  device const uchar* mp = mask + b * L;

  for (long d = tid; d < D; d += DIA_ATTN_GROUP) qs[d] = float(q[long(group) * D + d]);
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Output accumulation: thread tid owns dim d = tid % D for the keys j = s (mod S) of a chunk,
  // s = tid / D, S = DIA_ATTN_GROUP / D subsets; the subsets are summed at the end.
  const long S = DIA_ATTN_GROUP / D;
  const long s = long(tid) / D;
  const long d_own = long(tid) % D;
  const bool active = s < S;

  float m = kAttnMasked;  // running max of the scores
  float l = 0.0f;       // running sum of exp(score - m)
  float acc = 0.0f;     // running sum of exp(score - m) * v[., d_own] over this thread's keys
  for (long start = 0; start < L; start += DIA_ATTN_CHUNK) {
    const long n = L - start < DIA_ATTN_CHUNK ? L - start : long(DIA_ATTN_CHUNK);
    float local_max = kAttnMasked;
    for (long j = tid; j < n; j += DIA_ATTN_GROUP) {
      const long key = start + j;
      float sc = kAttnMasked;
      if (mp[key] != 0) {
        float dot = 0.0f;
        for (long d = 0; d < D; ++d) dot += qs[d] * float(kp[key * D + d]);
        sc = dot * scale;
      }
      scores[j] = sc;
      local_max = max(local_max, sc);
    }
    const float m_new = max(m, attn_reduce_max(red, local_max, tid));
    if (m_new <= kAttnMasked) continue;  // uniform across the group: every key so far is masked
    const float alpha = precise::exp(m - m_new);  // 0 while m is kAttnMasked
    float local_sum = 0.0f;
    for (long j = tid; j < n; j += DIA_ATTN_GROUP) {
      const float p = precise::exp(scores[j] - m_new);
      scores[j] = p;
      local_sum += p;
    }
    l = l * alpha + attn_reduce_sum(red, local_sum, tid);  // its barriers publish scores[]
    if (active) {
      acc *= alpha;
      for (long j = s; j < n; j += S) acc += scores[j] * float(vp[(start + j) * D + d_own]);
    }
    m = m_new;
    threadgroup_barrier(mem_flags::mem_threadgroup);  // scores[] is rewritten by the next chunk
  }
  red[tid] = active ? acc : 0.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (long(tid) < D) {
    float total = 0.0f;
    for (long k = 0; k < S; ++k) total += red[k * D + tid];
    out[long(group) * D + tid] = half(l > 0.0f ? total / l : 0.0f);
  }
}
