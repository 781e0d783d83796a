// Python bindings of sfgrpo._C. Every function takes raw addresses (tensor.data_ptr()) and sizes;
// the Python side (sfgrpo/_native.py and the ops) validates shapes, dtypes, devices and
// contiguity before calling in, so nothing here can be reached with a malformed tensor.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "sfgrpo/advantages.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check_dtype(const std::string& dtype) {
  if (dtype != "float32" && dtype != "float64") {
    throw std::invalid_argument("sfgrpo._C: unsupported dtype '" + dtype +
                                "' (expected float32 or float64)");
  }
}

py::dict build_info() {
  py::dict info;
  info["cpu"] = true;
#ifdef SFGRPO_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(SFGRPO_CUDA_ARCHS);
  info["cuda_compiler"] = std::string(SFGRPO_CUDA_COMPILER);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
  info["cuda_compiler"] = std::string("");
#endif
  info["cxx_compiler"] = std::string(SFGRPO_CXX_COMPILER);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sfgrpo native kernels (C++ CPU and, when built with nvcc, CUDA); no torch linkage";
  m.def("build_info", &build_info, "What this module was compiled with");

  py::module_ cpu = m.def_submodule("cpu", "CPU implementations");
  cpu.def(
      "dense_group_index",
      [](std::uintptr_t ids, int64_t n, std::uintptr_t out) {
        py::gil_scoped_release release;
        return sfgrpo::dense_group_index_cpu(as_ptr<const int64_t>(ids), n, as_ptr<int64_t>(out));
      },
      py::arg("ids"), py::arg("n"), py::arg("out"));
  cpu.def(
      "row_gains",
      [](const std::string& dtype, std::uintptr_t rewards, int64_t n, int64_t steps,
         std::uintptr_t gains) {
        check_dtype(dtype);
        py::gil_scoped_release release;
        if (dtype == "float32") {
          sfgrpo::row_gains_cpu(as_ptr<const float>(rewards), n, steps, as_ptr<float>(gains));
        } else {
          sfgrpo::row_gains_cpu(as_ptr<const double>(rewards), n, steps, as_ptr<double>(gains));
        }
      },
      py::arg("dtype"), py::arg("rewards"), py::arg("n"), py::arg("steps"), py::arg("gains"));

#ifdef SFGRPO_WITH_CUDA
  py::module_ cuda = m.def_submodule("cuda", "CUDA implementations (enqueued on the given stream)");
  cuda.def(
      "row_gains",
      [](const std::string& dtype, std::uintptr_t rewards, int64_t n, int64_t steps,
         std::uintptr_t gains, std::uintptr_t stream) {
        check_dtype(dtype);
        py::gil_scoped_release release;
        void* s = reinterpret_cast<void*>(stream);
        if (dtype == "float32") {
          sfgrpo::row_gains_cuda(as_ptr<const float>(rewards), n, steps, as_ptr<float>(gains), s);
        } else {
          sfgrpo::row_gains_cuda(as_ptr<const double>(rewards), n, steps, as_ptr<double>(gains),
                                 s);
        }
      },
      py::arg("dtype"), py::arg("rewards"), py::arg("n"), py::arg("steps"), py::arg("gains"),
      py::arg("stream"));
#endif
}
