// Python bindings of sfgrpo._C. Every function takes raw addresses (tensor.data_ptr()) and sizes;
// the Python side (sfgrpo/_native.py and the ops) validates shapes, dtypes, devices and
// contiguity before calling in, so nothing here can be reached with a malformed tensor.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

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

// Addresses of the five per-group statistics buffers: group ids, mean, std, size, zero_std.
using StatsAddresses = std::tuple<std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                                  std::uintptr_t>;

sfgrpo::AdvantageProblem make_problem(int64_t rows, int64_t width, bool gains, bool pooled,
                                      bool global_std, int ddof, double eps,
                                      std::optional<double> clip, std::uintptr_t column_mask) {
  if (rows < 0 || width < (gains ? 2 : 1)) {
    throw std::invalid_argument("sfgrpo._C: bad advantage problem size rows=" +
                                std::to_string(rows) + " width=" + std::to_string(width));
  }
  if (ddof != 0 && ddof != 1) throw std::invalid_argument("sfgrpo._C: ddof must be 0 or 1");
  sfgrpo::AdvantageProblem p;
  p.rows = rows;
  p.width = width;
  p.gains = gains;
  p.pooled = pooled;
  p.global_std = global_std;
  p.ddof = ddof;
  p.eps = eps;
  p.clip = clip.has_value();
  p.clip_value = clip.value_or(0.0);
  p.column_mask = as_ptr<const uint8_t>(column_mask);
  return p;
}

sfgrpo::GroupStatsBuffers make_stats(const std::optional<StatsAddresses>& addresses) {
  sfgrpo::GroupStatsBuffers stats;
  if (addresses) {
    stats.group_ids = as_ptr<int64_t>(std::get<0>(*addresses));
    stats.mean = as_ptr<double>(std::get<1>(*addresses));
    stats.std = as_ptr<double>(std::get<2>(*addresses));
    stats.size = as_ptr<int64_t>(std::get<3>(*addresses));
    stats.zero_std = as_ptr<uint8_t>(std::get<4>(*addresses));
  }
  return stats;
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

  cpu.def(
      "advantages",
      [](const std::string& dtype, std::uintptr_t rewards, std::uintptr_t group_ids,
         std::uintptr_t out, int64_t rows, int64_t width, bool gains, bool pooled, bool global_std,
         int ddof, double eps, std::optional<double> clip, std::uintptr_t column_mask,
         std::optional<StatsAddresses> stats, int num_threads) {
        check_dtype(dtype);
        const auto problem =
            make_problem(rows, width, gains, pooled, global_std, ddof, eps, clip, column_mask);
        const auto buffers = make_stats(stats);
        sfgrpo::AdvantageCounts counts;
        {
          py::gil_scoped_release release;
          const auto* ids = as_ptr<const int64_t>(group_ids);
          if (dtype == "float32") {
            counts = sfgrpo::advantages_cpu(problem, as_ptr<const float>(rewards), ids,
                                            as_ptr<float>(out), buffers, num_threads);
          } else {
            counts = sfgrpo::advantages_cpu(problem, as_ptr<const double>(rewards), ids,
                                            as_ptr<double>(out), buffers, num_threads);
          }
        }
        return py::make_tuple(counts.groups, counts.nonfinite_rows);
      },
      "Group-normalised advantages; returns (groups, nonfinite rows)", py::arg("dtype"),
      py::arg("rewards"), py::arg("group_ids"), py::arg("out"), py::arg("rows"), py::arg("width"),
      py::arg("gains"), py::arg("pooled"), py::arg("global_std"), py::arg("ddof"), py::arg("eps"),
      py::arg("clip"), py::arg("column_mask"), py::arg("stats"), py::arg("num_threads"));

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
  cuda.def(
      "advantages_workspace_bytes",
      [](int64_t rows, int64_t width, bool gains, bool pooled) {
        const auto problem = make_problem(rows, width, gains, pooled, false, 0, 0.0, {}, 0);
        return sfgrpo::advantages_cuda_workspace_bytes(problem);
      },
      "Bytes of scratch memory advantages() needs", py::arg("rows"), py::arg("width"),
      py::arg("gains"), py::arg("pooled"));
  cuda.def(
      "advantages",
      [](const std::string& dtype, std::uintptr_t rewards, std::uintptr_t group_ids,
         std::uintptr_t out, int64_t rows, int64_t width, bool gains, bool pooled, bool global_std,
         int ddof, double eps, std::optional<double> clip, std::uintptr_t column_mask,
         std::optional<StatsAddresses> stats, std::uintptr_t counts, std::uintptr_t workspace,
         std::size_t workspace_bytes, std::uintptr_t stream) {
        check_dtype(dtype);
        const auto problem =
            make_problem(rows, width, gains, pooled, global_std, ddof, eps, clip, column_mask);
        const auto buffers = make_stats(stats);
        py::gil_scoped_release release;
        const auto* ids = as_ptr<const int64_t>(group_ids);
        void* s = reinterpret_cast<void*>(stream);
        if (dtype == "float32") {
          sfgrpo::advantages_cuda(problem, as_ptr<const float>(rewards), ids, as_ptr<float>(out),
                                  buffers, as_ptr<int64_t>(counts), as_ptr<void>(workspace),
                                  workspace_bytes, s);
        } else {
          sfgrpo::advantages_cuda(problem, as_ptr<const double>(rewards), ids, as_ptr<double>(out),
                                  buffers, as_ptr<int64_t>(counts), as_ptr<void>(workspace),
                                  workspace_bytes, s);
        }
      },
      "Enqueues the advantages on `stream`; {groups, nonfinite rows} land in `counts` (device)",
      py::arg("dtype"), py::arg("rewards"), py::arg("group_ids"), py::arg("out"), py::arg("rows"),
      py::arg("width"), py::arg("gains"), py::arg("pooled"), py::arg("global_std"),
      py::arg("ddof"), py::arg("eps"), py::arg("clip"), py::arg("column_mask"), py::arg("stats"),
      py::arg("counts"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
#endif
}
