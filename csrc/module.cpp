// dia_fast._C: native helpers that need no libtorch (plain buffers through pybind11).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dia_fast native extension";
  m.def("abi_version", []() { return 1; }, "Version of the extension's Python-facing ABI.");
}
