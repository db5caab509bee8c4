// dia_fast._C: native CPU kernels that need no libtorch. Arrays come in through the buffer
// protocol (numpy arrays, or torch CPU tensors via .numpy()); outputs are written into
// caller-allocated arrays so Python can hand in torch-owned memory.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

#include "kernels.hpp"

#if defined(DIA_FAST_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

// Bump when a function's Python signature or semantics change: _ext.py refuses a stale build.
constexpr int kAbiVersion = 6;

#ifndef DIA_FAST_VERSION
#define DIA_FAST_VERSION "unknown"
#endif
#ifndef DIA_FAST_COMPILER
#define DIA_FAST_COMPILER "unknown"
#endif
#ifndef DIA_FAST_BUILD_TYPE
#define DIA_FAST_BUILD_TYPE "unknown"
#endif

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

template <typename T>
bool has_dtype(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);
}

void require_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
}

void require_ndim(const py::array& a, const char* name, py::ssize_t ndim) {
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) + " dims, got " +
                          std::to_string(a.ndim()));
  }
}

void require_shape(const py::array& a, const char* name, std::initializer_list<py::ssize_t> shape) {
  require_ndim(a, name, py::ssize_t(shape.size()));
  py::ssize_t d = 0;
  for (py::ssize_t s : shape) {
    if (a.shape(d) != s) throw py::value_error(std::string(name) + " has the wrong shape");
    ++d;
  }
}

// [lowest, highest) byte address an array touches (strides may be zero, e.g. expanded views).
std::pair<const char*, const char*> byte_extent(const py::array& a) {
  const auto* base = static_cast<const char*>(a.data());
  if (a.size() == 0) return {base, base};
  py::ssize_t lo = 0, hi = 0;
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    const py::ssize_t span = (a.shape(d) - 1) * a.strides(d);
    (span < 0 ? lo : hi) += span;
  }
  return {base + lo, base + hi + a.itemsize()};
}

// An output must be writable and must not share bytes with an input (the kernels read inputs
// while they write the output).
void require_output(const py::array& out, const char* name, std::initializer_list<const py::array*> inputs) {
  if (!out.writeable()) throw py::value_error(std::string(name) + " is read-only");
  require_c_contiguous(out, name);
  const auto o = byte_extent(out);
  for (const py::array* in : inputs) {
    const auto i = byte_extent(*in);
    if (o.first < o.second && i.first < i.second && o.first < i.second && i.first < o.second) {
      throw py::value_error(std::string(name) + " overlaps an input array");
    }
  }
}

// delays: int64 [C], non-negative (the Python side validates the pattern; this re-checks what
// would make the kernels read out of bounds).
const int64_t* delay_ptr(const py::array& delays, py::ssize_t C) {
  if (!has_dtype<int64_t>(delays)) throw py::type_error("delays must be int64, got " + dtype_name(delays));
  require_shape(delays, "delays", {C});
  require_c_contiguous(delays, "delays");
  const auto* d = static_cast<const int64_t*>(delays.data());
  for (py::ssize_t c = 0; c < C; ++c) {
    if (d[c] < 0) throw py::value_error("delays must be non-negative");
  }
  return d;
}

void check_codes(const py::array& codes) {
  require_ndim(codes, "codes", 3);
  require_c_contiguous(codes, "codes");
  if (!has_dtype<int64_t>(codes) && !has_dtype<int32_t>(codes)) {
    throw py::type_error("codes must be int32 or int64, got " + dtype_name(codes));
  }
}

void py_apply_delay(const py::array& codes, const py::array& delays, int64_t bos, int64_t pad, py::array& out) {
  check_codes(codes);
  const py::ssize_t B = codes.shape(0), T = codes.shape(1), C = codes.shape(2);
  const int64_t* d = delay_ptr(delays, C);
  require_shape(out, "out", {B, T, C});
  require_output(out, "out", {&codes, &delays});
  if (has_dtype<int64_t>(codes)) {
    if (!has_dtype<int64_t>(out)) throw py::type_error("out must have the dtype of codes");
    py::gil_scoped_release nogil;
    dia_fast::apply_delay<int64_t>(static_cast<const int64_t*>(codes.data()), static_cast<int64_t*>(out.mutable_data()),
                                   B, T, C, d, bos, pad);
  } else {
    if (!has_dtype<int32_t>(out)) throw py::type_error("out must have the dtype of codes");
    py::gil_scoped_release nogil;
    dia_fast::apply_delay<int32_t>(static_cast<const int32_t*>(codes.data()), static_cast<int32_t*>(out.mutable_data()),
                                   B, T, C, d, static_cast<int32_t>(bos), static_cast<int32_t>(pad));
  }
}

void py_revert_delay(const py::array& codes, const py::array& delays, py::array& out) {
  check_codes(codes);
  const py::ssize_t B = codes.shape(0), T = codes.shape(1), C = codes.shape(2);
  const int64_t* d = delay_ptr(delays, C);
  require_shape(out, "out", {B, T, C});
  require_output(out, "out", {&codes, &delays});
  if (has_dtype<int64_t>(codes)) {
    if (!has_dtype<int64_t>(out)) throw py::type_error("out must have the dtype of codes");
    py::gil_scoped_release nogil;
    dia_fast::revert_delay<int64_t>(static_cast<const int64_t*>(codes.data()),
                                    static_cast<int64_t*>(out.mutable_data()), B, T, C, d);
  } else {
    if (!has_dtype<int32_t>(out)) throw py::type_error("out must have the dtype of codes");
    py::gil_scoped_release nogil;
    dia_fast::revert_delay<int32_t>(static_cast<const int32_t*>(codes.data()),
                                    static_cast<int32_t*>(out.mutable_data()), B, T, C, d);
  }
}

void py_undelay_codes(const py::array& codes, const py::array& delays, int64_t codebook_size, py::array& out) {
  check_codes(codes);
  const py::ssize_t B = codes.shape(0), T = codes.shape(1), C = codes.shape(2);
  const int64_t* d = delay_ptr(delays, C);
  int64_t max_delay = 0;
  for (py::ssize_t c = 0; c < C; ++c) max_delay = d[c] > max_delay ? d[c] : max_delay;
  const py::ssize_t t_out = T > max_delay ? T - max_delay : 0;
  if (!has_dtype<int64_t>(out)) throw py::type_error("out must be int64, got " + dtype_name(out));
  require_shape(out, "out", {B, t_out, C});
  require_output(out, "out", {&codes, &delays});
  auto* o = static_cast<int64_t*>(out.mutable_data());
  if (has_dtype<int64_t>(codes)) {
    py::gil_scoped_release nogil;
    dia_fast::undelay_codes<int64_t>(static_cast<const int64_t*>(codes.data()), o, B, T, C, d, codebook_size);
  } else {
    py::gil_scoped_release nogil;
    dia_fast::undelay_codes<int32_t>(static_cast<const int32_t*>(codes.data()), o, B, T, C, d, codebook_size);
  }
}

// Logits may be strided views (e.g. the even / odd rows of a CFG batch) as long as the
// vocabulary dimension is contiguous; strides are in elements.
void check_logits(const py::array& a, const char* name, py::ssize_t B, py::ssize_t C, py::ssize_t V) {
  if (!has_dtype<float>(a)) throw py::type_error(std::string(name) + " must be float32, got " + dtype_name(a));
  require_shape(a, name, {B, C, V});
  if (V > 1 && a.strides(2) != py::ssize_t(sizeof(float))) {
    throw py::value_error(std::string(name) + " must be contiguous along the last dim");
  }
  if (a.strides(0) % py::ssize_t(sizeof(float)) != 0 || a.strides(1) % py::ssize_t(sizeof(float)) != 0) {
    throw py::value_error(std::string(name) + " has misaligned strides");
  }
}

// The logits and output of a sampling call: cond/uncond [B, C, V] float32 (last dim contiguous), out [B, C]
// int64 not overlapping them, eos_id in [0, V). Returns (B, C, V).
std::tuple<py::ssize_t, py::ssize_t, py::ssize_t> check_sample_io(const py::array& cond, const py::array& uncond,
                                                                  py::array& out, int64_t eos_id) {
  require_ndim(cond, "cond", 3);
  const py::ssize_t B = cond.shape(0), C = cond.shape(1), V = cond.shape(2);
  check_logits(cond, "cond", B, C, V);
  check_logits(uncond, "uncond", B, C, V);
  if (eos_id < 0 || eos_id >= V) throw py::value_error("eos_id must be in [0, V)");
  if (!has_dtype<int64_t>(out)) throw py::type_error("out must be int64, got " + dtype_name(out));
  require_shape(out, "out", {B, C});
  require_output(out, "out", {&cond, &uncond});
  return {B, C, V};
}

void py_cfg_sample(const py::array& cond, const py::array& uncond, py::array& out, double cfg_scale,
                   double temperature, double top_p, int64_t top_k, int64_t eos_id, const py::object& uniforms) {
  const auto [B, C, V] = check_sample_io(cond, uncond, out, eos_id);
  const float* u = nullptr;
  py::array u_arr;
  if (!uniforms.is_none()) {
    if (!py::isinstance<py::array>(uniforms)) throw py::type_error("uniforms must be a float32 array or None");
    u_arr = py::reinterpret_borrow<py::array>(uniforms);
    if (!has_dtype<float>(u_arr)) throw py::type_error("uniforms must be float32, got " + dtype_name(u_arr));
    require_shape(u_arr, "uniforms", {B * C});
    require_c_contiguous(u_arr, "uniforms");
    u = static_cast<const float*>(u_arr.data());
  }
  dia_fast::SampleParams p;
  p.cfg_scale = static_cast<float>(cfg_scale);
  p.temperature = static_cast<float>(temperature);
  p.top_p = static_cast<float>(top_p);
  p.top_k = top_k;
  p.eos_id = eos_id;
  const auto fs = py::ssize_t(sizeof(float));
  py::gil_scoped_release nogil;
  dia_fast::cfg_sample(static_cast<const float*>(cond.data()), static_cast<const float*>(uncond.data()), B, C, V,
                       cond.strides(0) / fs, cond.strides(1) / fs, uncond.strides(0) / fs, uncond.strides(1) / fs, u,
                       static_cast<int64_t*>(out.mutable_data()), p);
}

void py_float_to_pcm16(const py::array& src, py::array& dst, bool dither, const py::int_& seed) {
  if (!has_dtype<float>(src)) throw py::type_error("src must be float32, got " + dtype_name(src));
  if (!has_dtype<int16_t>(dst)) throw py::type_error("dst must be int16, got " + dtype_name(dst));
  require_ndim(src, "src", 1);
  require_ndim(dst, "dst", 1);
  require_c_contiguous(src, "src");
  if (dst.shape(0) != src.shape(0)) throw py::value_error("src and dst must have the same length");
  require_output(dst, "dst", {&src});
  // Any Python int is a valid seed: negative or huge values wrap modulo 2^64.
  const uint64_t s = PyLong_AsUnsignedLongLongMask(seed.ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  py::gil_scoped_release nogil;
  dia_fast::float_to_pcm16(static_cast<const float*>(src.data()), static_cast<int16_t*>(dst.mutable_data()),
                           src.shape(0), dither, s);
}

// --- the decode step's hot ops: unchecked entries on addresses -------------------------------------------------
//
// A decode step on a CPU calls these ~30 times, between GEMMs that have just flushed the caches: converting
// each tensor to a numpy array (four torch calls) and checking it here cost more than most of the ops. So they
// take addresses and sizes, and their one caller, python/dia_fast/ops/cpp.py, checks what the addresses point
// at (device, dtype, shape, strides, a freshly allocated output) before it calls. Do not call them elsewhere.

template <typename T>
T* at(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void raw_int8_linear(uintptr_t x, int64_t M, int64_t K, uintptr_t w, uintptr_t scale, int64_t N, uintptr_t out,
                     int isa) {
  py::gil_scoped_release nogil;
  dia_fast::int8_linear(at<const float>(x), M, K, K, at<const int8_t>(w), at<const float>(scale), N, at<float>(out),
                        N, isa);
}

void raw_int4_linear(uintptr_t x, int64_t M, int64_t K, uintptr_t w, uintptr_t scale, int64_t group, int64_t N,
                     uintptr_t out, int isa) {
  py::gil_scoped_release nogil;
  dia_fast::int4_linear(at<const float>(x), M, K, K, at<const uint8_t>(w), at<const float>(scale), group, N,
                        at<float>(out), N, isa);
}

void raw_add_rmsnorm(uintptr_t residual, uintptr_t delta, uintptr_t weight, double eps, int64_t rows, int64_t D,
                     uintptr_t normed, uintptr_t h_out) {
  py::gil_scoped_release nogil;
  dia_fast::add_rmsnorm(at<const float>(residual), at<const float>(delta), at<const float>(weight),
                        static_cast<float>(eps), rows, D, at<float>(normed), at<float>(h_out));
}

void raw_swiglu(uintptr_t gate_up, int64_t rows, int64_t H, uintptr_t out) {
  py::gil_scoped_release nogil;
  dia_fast::swiglu(at<const float>(gate_up), rows, H, at<float>(out));
}

int64_t raw_embed_codes(uintptr_t codes, int64_t rows, int64_t C, uintptr_t table, int64_t vocab, int64_t D,
                        uintptr_t out) {
  py::gil_scoped_release nogil;
  return dia_fast::embed_codes(at<const int64_t>(codes), rows, C, at<const float>(table), vocab, D, at<float>(out));
}

int64_t raw_rope_kv_write(uintptr_t qkv, int64_t R, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, uintptr_t start,
                          int64_t n_start, uintptr_t cos, uintptr_t sin, int64_t P, uintptr_t k_cache,
                          uintptr_t v_cache, int64_t cache_sr, int64_t cache_sh, int64_t L, uintptr_t q_out) {
  const dia_fast::RopeKvArgs a{at<const float>(qkv), R, T, Hq, Hkv, D, at<const int64_t>(start), n_start,
                               at<const float>(cos), at<const float>(sin), P, at<float>(k_cache),
                               at<float>(v_cache), cache_sr, cache_sh, L, at<float>(q_out)};
  py::gil_scoped_release nogil;
  return dia_fast::rope_kv_write(a);
}

void raw_decode_attention(uintptr_t q, int64_t B, int64_t Hq, int64_t D, uintptr_t k, uintptr_t v, int64_t Hkv,
                          int64_t L, int64_t k_sb, int64_t k_sh, int64_t v_sb, int64_t v_sh, uintptr_t kv_len,
                          int64_t n_len, uintptr_t key_mask, int64_t mask_sb, double scale, uintptr_t out) {
  const dia_fast::DecodeAttentionArgs a{at<const float>(q),      B,    Hq,   D,    at<const float>(k),
                                        at<const float>(v),      Hkv,  L,    k_sb, k_sh,
                                        v_sb,                    v_sh, at<const int64_t>(kv_len), n_len,
                                        at<const uint8_t>(key_mask), mask_sb, static_cast<float>(scale),
                                        at<float>(out)};
  py::gil_scoped_release nogil;
  dia_fast::decode_attention(a);
}

int64_t raw_step_update(uintptr_t codes, uintptr_t codes_out, int64_t B, int64_t C, int64_t L, int64_t R, uintptr_t pos,
                        uintptr_t eos_pos, uintptr_t delays, uintptr_t forced_eos_pos, int64_t n_forced_eos,
                        uintptr_t forced, uintptr_t out, uintptr_t real, uintptr_t done, uintptr_t tokens,
                        uintptr_t min_eos_pos, uintptr_t allow_eos, int64_t eos_value, int64_t pad_value) {
  const dia_fast::StepUpdateArgs a{at<const int64_t>(codes),  at<int64_t>(codes_out), B, C, L, R,
                                   at<const int64_t>(pos),    at<int64_t>(eos_pos),   at<const int64_t>(delays),
                                   at<const int64_t>(forced_eos_pos), n_forced_eos,  at<const int64_t>(forced),
                                   at<int64_t>(out),          at<const bool>(real),   at<bool>(done),
                                   at<int64_t>(tokens),       at<const int64_t>(min_eos_pos),
                                   at<bool>(allow_eos),       eos_value,              pad_value};
  return dia_fast::step_update(a);
}

void raw_slot_update(uintptr_t codes, int64_t S, int64_t C, int64_t L, uintptr_t pos, uintptr_t eos_pos,
                     uintptr_t delays, uintptr_t forced_eos_pos, uintptr_t min_eos_pos, uintptr_t forced, uintptr_t out,
                     uintptr_t active, uintptr_t finished, uintptr_t allow_eos, uintptr_t tokens, uintptr_t row_pos,
                     int64_t eos_value, int64_t pad_value) {
  const dia_fast::SlotUpdateArgs a{at<const int64_t>(codes),  S,
                                   C,                         L,
                                   at<int64_t>(pos),          at<int64_t>(eos_pos),
                                   at<const int64_t>(delays), at<const int64_t>(forced_eos_pos),
                                   at<const int64_t>(min_eos_pos), at<const int64_t>(forced),
                                   at<int64_t>(out),          at<const bool>(active),
                                   at<bool>(finished),        at<bool>(allow_eos),
                                   at<int64_t>(tokens),       at<int64_t>(row_pos),
                                   eos_value,                 pad_value};
  py::gil_scoped_release nogil;
  dia_fast::slot_update(a);
}

void raw_cfg_sample_rows(uintptr_t cond, uintptr_t uncond, int64_t B, int64_t C, int64_t V, int64_t cond_sb,
                         int64_t cond_sc, int64_t uncond_sb, int64_t uncond_sc, uintptr_t out, uintptr_t cfg_scale,
                         uintptr_t temperature, uintptr_t top_p, uintptr_t top_k, uintptr_t seeds, uintptr_t offsets,
                         uintptr_t allow_eos, int64_t eos_id) {
  dia_fast::RowSampleParams p;
  p.cfg_scale = at<const float>(cfg_scale);
  p.temperature = at<const float>(temperature);
  p.top_p = at<const float>(top_p);
  p.top_k = at<const int64_t>(top_k);
  p.seed = at<const uint64_t>(seeds);
  p.offset = at<const int64_t>(offsets);
  p.allow_eos = at<const uint8_t>(allow_eos);
  p.eos_id = eos_id;
  py::gil_scoped_release nogil;
  dia_fast::cfg_sample_rows(at<const float>(cond), at<const float>(uncond), B, C, V, cond_sb, cond_sc, uncond_sb,
                            uncond_sc, at<int64_t>(out), p);
}

py::dict build_info() {
  py::dict d;
  d["version"] = DIA_FAST_VERSION;
  d["abi_version"] = kAbiVersion;
  d["compiler"] = DIA_FAST_COMPILER;
#if defined(__clang__)
  d["compiler_version_string"] = __clang_version__;
#elif defined(__GNUC__)
  d["compiler_version_string"] = __VERSION__;
#else
  d["compiler_version_string"] = "";
#endif
  d["build_type"] = DIA_FAST_BUILD_TYPE;
  d["cxx_standard"] = long(__cplusplus);
#if defined(DIA_FAST_OPENMP)
  d["openmp"] = true;
  d["openmp_version"] = long(_OPENMP);
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_version"] = py::none();
  d["openmp_max_threads"] = 1;
#endif
#if defined(__x86_64__) || defined(_M_X64)
  d["arch"] = "x86_64";
#elif defined(__aarch64__) || defined(_M_ARM64)
  d["arch"] = "aarch64";
#else
  d["arch"] = "other";
#endif
  d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) + "." +
                  std::to_string(PYBIND11_VERSION_PATCH);
  py::list kernels;
  for (const char* k :
       {"apply_delay", "revert_delay", "undelay_codes", "cfg_sample", "cfg_sample_rows", "float_to_pcm16", "int8_linear", "int4_linear",
        "add_rmsnorm", "swiglu", "embed_codes", "rope_kv_write", "decode_attention", "step_update", "slot_update"})
    kernels.append(k);
  d["kernels"] = kernels;
  d["int8_linear_isa"] = dia_fast::int8_linear_best_isa();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dia_fast native CPU kernels (no libtorch: numpy arrays / buffers in, caller-owned outputs)";
  m.def("abi_version", []() { return kAbiVersion; }, "Version of the extension's Python-facing ABI.");
  m.def("build_info", &build_info, "Compiler, OpenMP, version and architecture this extension was built with.");
  m.def("apply_delay", &py_apply_delay, py::arg("codes"), py::arg("delays"), py::arg("bos"), py::arg("pad"),
        py::arg("out").noconvert(),
        "out[b,t,c] = codes[b,t-d_c,c] (bos before the start, pad past the end). codes/out: C-contiguous "
        "int32 or int64 [B,T,C] (same dtype); delays: int64 [C].");
  m.def("revert_delay", &py_revert_delay, py::arg("codes"), py::arg("delays"), py::arg("out").noconvert(),
        "out[b,t,c] = codes[b,min(t+d_c,T-1),c]. codes/out: C-contiguous int32 or int64 [B,T,C].");
  m.def("undelay_codes", &py_undelay_codes, py::arg("codes"), py::arg("delays"), py::arg("codebook_size"),
        py::arg("out").noconvert(),
        "Revert the delay, drop the last max(d) frames, map values outside [0, codebook_size) to 0. "
        "out: int64 [B, max(T-max(d),0), C].");
  m.def("cfg_sample", &py_cfg_sample, py::arg("cond"), py::arg("uncond"), py::arg("out").noconvert(),
        py::arg("cfg_scale"), py::arg("temperature"), py::arg("top_p"), py::arg("top_k"), py::arg("eos_id"),
        py::arg("uniforms") = py::none(),
        "CFG + top-k + Dia's EOS rules on float32 [B,C,V] logits (last dim contiguous) into out int64 [B,C]. "
        "uniforms None: greedy; else float32 [B*C] in [0,1): temperature, top-p and an inverse-CDF draw in "
        "ascending token id order. top_k <= 0 or >= V: no top-k.");
  m.def("int8_linear_best_isa", &dia_fast::int8_linear_best_isa,
        "The fastest int8_linear this CPU runs: 0 portable, 1 AVX2+FMA, 2 AVX-512 (F, BW, VL), 3 AVX-512 with VNNI.");
  // Unchecked (see above): addresses of tensors that python/dia_fast/ops/cpp.py has checked.
  m.def("int8_linear", &raw_int8_linear,
        "out[m,n] = scale[n] * sum_k x[m,k] * w[n,k]: x float32 [M,K], w int8 [N,K], scale float32 [N], out float32 "
        "[M,N], all C-contiguous; isa as int8_linear_best_isa() or lower.");
  m.def("int4_linear", &raw_int4_linear,
        "out[m,n] = sum_g scale[n,g] * sum_{k in g} x[m,k] * w[n,k]: x float32 [M,K], w int4 packed uint8 [N,K/2] "
        "(ops.reference.pack_int4), scale float32 [N,K/group], out float32 [M,N], all C-contiguous; K and group "
        "multiples of 64, group divides K; isa as int8_linear_best_isa() or lower.");
  m.def("add_rmsnorm", &raw_add_rmsnorm,
        "h = residual + delta (into h_out; delta 0: h = residual), normed = h / sqrt(mean(h^2) + eps) * weight; "
        "float32 [rows, D] C-contiguous, weight [D].");
  m.def("swiglu", &raw_swiglu, "out = silu(gate) * up for gate_up = [gate | up] float32 [rows, 2H] -> [rows, H].");
  m.def("embed_codes", &raw_embed_codes,
        "out[r] = sum_c table[c * vocab + codes[r, c]] (codes int64 [rows, C], table float32 [C * vocab, D]); returns "
        "-1, or the flat index of the first code outside [0, vocab) (nothing written).");
  m.def("rope_kv_write", &raw_rope_kv_write,
        "Rotate-half RoPE of the q and k heads of qkv float32 [R, T, (Hq + 2 Hkv) D] at positions start + t, k and v "
        "into the caches [R, Hkv, L, D], q into q_out [R, Hq, T, D]; returns -1, or the first row whose positions "
        "fall outside [0, min(L, P)) (nothing written).");
  m.def("cfg_sample_rows", &raw_cfg_sample_rows,
        "The seeded CFG sampling step of dia_fast.ops.reference.cfg_sample on float32 [B,C,V] logits (last dim "
        "contiguous, strides in elements) into out int64 [B,C], with per-row [B] settings: cfg_scale, temperature (0: "
        "greedy), top_p (float32), top_k (int64; <= 0: no CFG filter), seeds and offsets (int64: Philox4x32-10 key "
        "and counter offset), allow_eos (bool, or 0: every row may end).");
  m.def("step_update", &raw_step_update,
        "dia_fast.ops.reference.step_update on int64 codes [B, C] (codes_out [B, C] a scratch for the final codes); "
        "returns -1, or a non-negative value when the position is outside the output (nothing written).");
  m.def("slot_update", &raw_slot_update,
        "dia_fast.ops.reference.slot_update (continuous batching's per-slot bookkeeping) on int64 codes [S, C], "
        "buffers of S slots of L >= 1 positions, tokens [2S, C], row_pos [2S].");
  m.def("decode_attention", &raw_decode_attention,
        "One query step: q float32 [B, Hq, D] against caches [B, Hkv, L, D] ([L, D] contiguous), keys below kv_len "
        "and in key_mask (0: none) -> out [B, Hq, D].");
  m.def("float_to_pcm16", &py_float_to_pcm16, py::arg("src"), py::arg("dst").noconvert(), py::arg("dither"),
        py::arg("seed"),
        "dst = clip(rint(src * 32767 [+ TPDF dither]), -32768, 32767) with rint half to even and NaN -> 0. "
        "src: float32 [N] contiguous, dst: int16 [N]. The dither is (u(2i) + u(2i+1)) LSB, u(n) = "
        "(splitmix64_n(seed) >> 40) * 2^-24 - 0.5, the n-th output of SplitMix64 seeded with `seed`.");
}
