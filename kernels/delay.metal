// Delay-pattern kernels for Apple GPUs (compiled at run time by dia_fast/ops/metal.py through
// torch.mps.compile_shader). Semantics: dia_fast.ops.reference.apply_delay / revert_delay /
// undelay_codes on C-contiguous int64 [B, T, C] code arrays; one thread per output element.
// Arguments bind in order (buffer(i) = i-th argument of the Python call): tensors are device
// buffers, Python ints arrive as `constant long&`. Keep ops/metal.py's SIGNATURES in sync.
#include <metal_stdlib>
using namespace metal;

// out[b, t, c] = codes[b, t - d_c, c]; bos where t - d_c < 0; pad where t - d_c >= T.
kernel void dia_apply_delay(device const long* codes [[buffer(0)]],
                            device long* out [[buffer(1)]],
                            device const long* delays [[buffer(2)]],
                            constant long& n [[buffer(3)]],
                            constant long& T [[buffer(4)]],
                            constant long& C [[buffer(5)]],
                            constant long& bos [[buffer(6)]],
                            constant long& pad [[buffer(7)]],
                            uint gid [[thread_position_in_grid]]) {
  const long i = long(gid);
  if (i >= n) return;
  const long c = i % C;
  const long t = (i / C) % T;
  const long s = t - delays[c];
  out[i] = s < 0 ? bos : (s >= T ? pad : codes[i + (s - t) * C]);
}

// out[b, t, c] = codes[b, min(t + d_c, T - 1), c].
kernel void dia_revert_delay(device const long* codes [[buffer(0)]],
                             device long* out [[buffer(1)]],
                             device const long* delays [[buffer(2)]],
                             constant long& n [[buffer(3)]],
                             constant long& T [[buffer(4)]],
                             constant long& C [[buffer(5)]],
                             uint gid [[thread_position_in_grid]]) {
  const long i = long(gid);
  if (i >= n) return;
  const long c = i % C;
  const long t = (i / C) % T;
  const long s = t + delays[c] < T - 1 ? t + delays[c] : T - 1;
  out[i] = codes[i + (s - t) * C];
}

// out [B, T_out, C] with T_out = T - max(d): revert the delay, then values outside
// [0, codebook_size) become 0.
kernel void dia_undelay_codes(device const long* codes [[buffer(0)]],
                              device long* out [[buffer(1)]],
                              device const long* delays [[buffer(2)]],
                              constant long& n [[buffer(3)]],
                              constant long& T [[buffer(4)]],
                              constant long& C [[buffer(5)]],
                              constant long& T_out [[buffer(6)]],
                              constant long& codebook_size [[buffer(7)]],
                              uint gid [[thread_position_in_grid]]) {
  const long i = long(gid);
  if (i >= n) return;
  const long c = i % C;
  const long t = (i / C) % T_out;
  const long b = i / (C * T_out);
  const long s = t + delays[c] < T - 1 ? t + delays[c] : T - 1;
  const long v = codes[(b * T + s) * C + c];
  out[i] = (v < 0 || v >= codebook_size) ? 0 : v;
}
