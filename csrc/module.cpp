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
constexpr int kAbiVersion = 4;

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

template <typename T>
const T* row_array(const py::array& a, const char* name, py::ssize_t B) {
  if (!has_dtype<T>(a)) throw py::type_error(std::string(name) + " has the wrong dtype: " + dtype_name(a));
  require_shape(a, name, {B});
  require_c_contiguous(a, name);
  return static_cast<const T*>(a.data());
}

void py_cfg_sample_rows(const py::array& cond, const py::array& uncond, py::array& out, const py::array& cfg_scale,
                        const py::array& temperature, const py::array& top_p, const py::array& top_k,
                        const py::array& seeds, const py::array& offsets, const py::object& allow_eos,
                        int64_t eos_id) {
  const auto [B, C, V] = check_sample_io(cond, uncond, out, eos_id);
  dia_fast::RowSampleParams p;
  p.cfg_scale = row_array<float>(cfg_scale, "cfg_scale", B);
  p.temperature = row_array<float>(temperature, "temperature", B);
  p.top_p = row_array<float>(top_p, "top_p", B);
  p.top_k = row_array<int64_t>(top_k, "top_k", B);
  p.seed = reinterpret_cast<const uint64_t*>(row_array<int64_t>(seeds, "seeds", B));
  p.offset = row_array<int64_t>(offsets, "offsets", B);
  py::array allow_arr;
  if (!allow_eos.is_none()) {
    allow_arr = py::reinterpret_borrow<py::array>(allow_eos);
    p.allow_eos = row_array<uint8_t>(allow_arr, "allow_eos", B);
  }
  p.eos_id = eos_id;
  const auto fs = py::ssize_t(sizeof(float));
  py::gil_scoped_release nogil;
  dia_fast::cfg_sample_rows(static_cast<const float*>(cond.data()), static_cast<const float*>(uncond.data()), B, C, V,
                            cond.strides(0) / fs, cond.strides(1) / fs, uncond.strides(0) / fs,
                            uncond.strides(1) / fs, static_cast<int64_t*>(out.mutable_data()), p);
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

void py_int8_linear(const py::array& x, const py::array& w, const py::array& scale, py::array& out, int isa) {
  if (!has_dtype<float>(x)) throw py::type_error("x must be float32, got " + dtype_name(x));
  if (!has_dtype<int8_t>(w)) throw py::type_error("w must be int8, got " + dtype_name(w));
  if (!has_dtype<float>(scale)) throw py::type_error("scale must be float32, got " + dtype_name(scale));
  if (!has_dtype<float>(out)) throw py::type_error("out must be float32, got " + dtype_name(out));
  require_ndim(x, "x", 2);
  require_ndim(w, "w", 2);
  const py::ssize_t M = x.shape(0), K = x.shape(1), N = w.shape(0);
  if (w.shape(1) != K) throw py::value_error("w must be [N, K] with the K of x [M, K]");
  require_shape(scale, "scale", {N});
  require_shape(out, "out", {M, N});
  require_c_contiguous(x, "x");
  require_c_contiguous(w, "w");
  require_c_contiguous(scale, "scale");
  require_output(out, "out", {&x, &w, &scale});
  const int best = dia_fast::int8_linear_best_isa();
  if (isa < 0) isa = best;
  if (isa > best) throw py::value_error("isa " + std::to_string(isa) + " is not supported by this CPU (best: " +
                                        std::to_string(best) + ")");
  py::gil_scoped_release nogil;
  dia_fast::int8_linear(static_cast<const float*>(x.data()), M, K, K, static_cast<const int8_t*>(w.data()),
                        static_cast<const float*>(scale.data()), N, static_cast<float*>(out.mutable_data()), N, isa);
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
       {"apply_delay", "revert_delay", "undelay_codes", "cfg_sample", "cfg_sample_rows", "float_to_pcm16", "int8_linear"})
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
  m.def("cfg_sample_rows", &py_cfg_sample_rows, py::arg("cond"), py::arg("uncond"), py::arg("out").noconvert(),
        py::arg("cfg_scale"), py::arg("temperature"), py::arg("top_p"), py::arg("top_k"), py::arg("seeds"),
        py::arg("offsets"), py::arg("allow_eos"), py::arg("eos_id"),
        "The seeded CFG sampling step of dia_fast.ops.reference.cfg_sample on float32 [B,C,V] logits (last dim "
        "contiguous) into out int64 [B,C], with per-row [B] settings: cfg_scale, temperature (0: greedy), top_p "
        "(float32), top_k (int64; <= 0: no CFG filter, the guided logits are sampled), seeds and offsets (int64: "
        "Philox4x32-10 key and counter offset), allow_eos (uint8 or None).");
  m.def("int8_linear", &py_int8_linear, py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("out").noconvert(),
        py::arg("isa") = -1,
        "Weight-only int8 linear: out[m,n] = scale[n] * sum_k x[m,k] * w[n,k]. x: float32 [M,K], w: int8 [N,K], "
        "scale: float32 [N], out: float32 [M,N], all C-contiguous. isa: -1 the best this CPU runs, else 0 portable, "
        "1 AVX2+FMA, 2 AVX-512 (F, BW, VL), 3 AVX-512 with VNNI.");
  m.def("float_to_pcm16", &py_float_to_pcm16, py::arg("src"), py::arg("dst").noconvert(), py::arg("dither"),
        py::arg("seed"),
        "dst = clip(rint(src * 32767 [+ TPDF dither]), -32768, 32767) with rint half to even and NaN -> 0. "
        "src: float32 [N] contiguous, dst: int16 [N]. The dither is (u(2i) + u(2i+1)) LSB, u(n) = "
        "(splitmix64_n(seed) >> 40) * 2^-24 - 0.5, the n-th output of SplitMix64 seeded with `seed`.");
}
