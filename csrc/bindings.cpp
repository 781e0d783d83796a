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
#include <vector>

#include "sfgrpo/advantages.h"
#include "sfgrpo/fixed_point_advantages.h"
#include "sfgrpo/fixed_point_blocks.h"
#include "sfgrpo/sde_step.h"

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

// A latent crosses as (address, storage code); address 0 = absent.
using LatentArg = std::tuple<std::uintptr_t, int>;

sfgrpo::Storage storage(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("sfgrpo._C: bad storage code " + std::to_string(code));
  return static_cast<sfgrpo::Storage>(code);
}

sfgrpo::Latent latent(const LatentArg& arg) {
  return {reinterpret_cast<const void*>(std::get<0>(arg)), storage(std::get<1>(arg))};
}

sfgrpo::MutableLatent mutable_latent(const LatentArg& arg) {
  return {reinterpret_cast<void*>(std::get<0>(arg)), storage(std::get<1>(arg))};
}

// (rows, elements, sde type code, flow_grpo log-prob, sum reduction, flow_grpo KL,
//  then for each of t, t_next, noise_level, sigma_max: (address of a float32 [rows] array, or 0
//  for one value for every row; that value))
using RowValueArg = std::tuple<std::uintptr_t, float>;
using SdeProblemArg = std::tuple<int64_t, int64_t, int, bool, bool, bool, RowValueArg, RowValueArg,
                                 RowValueArg, RowValueArg>;

sfgrpo::RowValue row_value(const RowValueArg& arg) {
  return {as_ptr<const float>(std::get<0>(arg)), std::get<1>(arg)};
}

sfgrpo::SdeStepProblem sde_problem(const SdeProblemArg& arg) {
  sfgrpo::SdeStepProblem p;
  p.rows = std::get<0>(arg);
  p.elements = std::get<1>(arg);
  const int type = std::get<2>(arg);
  if (p.rows < 0 || p.elements < 1 || type < 0 || type > 3) {
    throw std::invalid_argument("sfgrpo._C: bad sde_step problem rows=" + std::to_string(p.rows) +
                                " elements=" + std::to_string(p.elements) + " type=" + std::to_string(type));
  }
  p.sde_type = static_cast<sfgrpo::SdeType>(type);
  p.flow_grpo_logprob = std::get<3>(arg);
  p.sum_reduction = std::get<4>(arg);
  p.flow_grpo_kl = std::get<5>(arg);
  p.t = row_value(std::get<6>(arg));
  p.t_next = row_value(std::get<7>(arg));
  p.noise_level = row_value(std::get<8>(arg));
  p.sigma_max = row_value(std::get<9>(arg));
  return p;
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

// Runs a host advantage engine, engine(problem, rewards, ids, out, stats), on the float32 or
// float64 matrices at the given addresses without the GIL; returns (groups, nonfinite rows).
template <typename Engine>
py::tuple run_host_advantages(const std::string& dtype, std::uintptr_t rewards, std::uintptr_t group_ids,
                              std::uintptr_t out, const sfgrpo::AdvantageProblem& problem,
                              const sfgrpo::GroupStatsBuffers& stats, Engine engine) {
  check_dtype(dtype);
  sfgrpo::AdvantageCounts counts;
  {
    py::gil_scoped_release release;
    const auto* ids = as_ptr<const int64_t>(group_ids);
    if (dtype == "float32") {
      counts = engine(problem, as_ptr<const float>(rewards), ids, as_ptr<float>(out), stats);
    } else {
      counts = engine(problem, as_ptr<const double>(rewards), ids, as_ptr<double>(out), stats);
    }
  }
  return py::make_tuple(counts.groups, counts.nonfinite_rows);
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
        return run_host_advantages(
            dtype, rewards, group_ids, out,
            make_problem(rows, width, gains, pooled, global_std, ddof, eps, clip, column_mask),
            make_stats(stats), [&](const auto& p, const auto* r, const int64_t* ids, auto* o, const auto& b) {
              return sfgrpo::advantages_cpu(p, r, ids, o, b, num_threads);
            });
      },
      "Group-normalised advantages; returns (groups, nonfinite rows)", py::arg("dtype"),
      py::arg("rewards"), py::arg("group_ids"), py::arg("out"), py::arg("rows"), py::arg("width"),
      py::arg("gains"), py::arg("pooled"), py::arg("global_std"), py::arg("ddof"), py::arg("eps"),
      py::arg("clip"), py::arg("column_mask"), py::arg("stats"), py::arg("num_threads"));

  cpu.def(
      "sde_step_forward",
      [](const SdeProblemArg& problem, const LatentArg& x, const LatentArg& v,
         const LatentArg& prev_sample, const LatentArg& noise, const LatentArg& v_ref,
         const LatentArg& sample, std::uintptr_t log_prob, std::uintptr_t std_out,
         std::uintptr_t std_dev_t, std::uintptr_t mean, std::uintptr_t x0_hat,
         std::uintptr_t x1_hat, std::uintptr_t kl, int num_threads,
         std::optional<std::tuple<uint64_t, uint64_t>> philox) {
        const auto p = sde_problem(problem);
        sfgrpo::SdeForwardInputs in{latent(x), latent(v), latent(prev_sample), latent(noise),
                                    latent(v_ref)};
        if (philox) {
          in.philox = true;
          in.philox_seed = std::get<0>(*philox);
          in.philox_offset = std::get<1>(*philox);
        }
        sfgrpo::SdeForwardOutputs out;
        out.sample = mutable_latent(sample);
        out.log_prob = as_ptr<float>(log_prob);
        out.std = as_ptr<float>(std_out);
        out.std_dev_t = as_ptr<float>(std_dev_t);
        out.mean = as_ptr<float>(mean);
        out.x0_hat = as_ptr<float>(x0_hat);
        out.x1_hat = as_ptr<float>(x1_hat);
        out.kl = as_ptr<float>(kl);
        if (!in.x.present() || !in.v.present() ||
            (!in.prev_sample.present() && !in.noise.present() && !in.philox)) {
          throw std::invalid_argument("sfgrpo._C: sde_step_forward needs x, v and prev_sample, noise or philox");
        }
        py::gil_scoped_release release;
        sfgrpo::sde_step_forward_cpu(p, in, out, num_threads);
      },
      "Fused SDE step forward on [rows, elements] latents (addresses 0 = absent)",
      py::arg("problem"), py::arg("x"), py::arg("v"), py::arg("prev_sample"), py::arg("noise"),
      py::arg("v_ref"), py::arg("sample"), py::arg("log_prob"), py::arg("std"),
      py::arg("std_dev_t"), py::arg("mean"), py::arg("x0_hat"), py::arg("x1_hat"), py::arg("kl"),
      py::arg("num_threads"), py::arg("philox") = py::none());
  cpu.def(
      "sde_step_backward",
      [](const SdeProblemArg& problem, const LatentArg& x, const LatentArg& v,
         const LatentArg& sample, const LatentArg& v_ref, std::uintptr_t grad_log_prob,
         std::uintptr_t grad_kl, std::uintptr_t grad_mean, std::uintptr_t grad_x0,
         std::uintptr_t grad_x1, const LatentArg& dv, const LatentArg& dv_ref, const LatentArg& dx,
         int num_threads) {
        const auto p = sde_problem(problem);
        sfgrpo::SdeBackwardInputs in;
        in.x = latent(x);
        in.v = latent(v);
        in.sample = latent(sample);
        in.v_ref = latent(v_ref);
        in.grad_log_prob = as_ptr<const float>(grad_log_prob);
        in.grad_kl = as_ptr<const float>(grad_kl);
        in.grad_mean = as_ptr<const float>(grad_mean);
        in.grad_x0 = as_ptr<const float>(grad_x0);
        in.grad_x1 = as_ptr<const float>(grad_x1);
        sfgrpo::SdeBackwardOutputs out{mutable_latent(dv), mutable_latent(dv_ref), mutable_latent(dx)};
        if (!in.x.present() || !in.v.present() || !out.dv.present() ||
            (in.grad_log_prob != nullptr && !in.sample.present())) {
          throw std::invalid_argument("sfgrpo._C: sde_step_backward needs x, v, dv (and the sample for a log-prob gradient)");
        }
        py::gil_scoped_release release;
        sfgrpo::sde_step_backward_cpu(p, in, out, num_threads);
      },
      "Fused SDE step backward (addresses 0 = absent)", py::arg("problem"), py::arg("x"),
      py::arg("v"), py::arg("sample"), py::arg("v_ref"), py::arg("grad_log_prob"),
      py::arg("grad_kl"), py::arg("grad_mean"), py::arg("grad_x0"), py::arg("grad_x1"),
      py::arg("dv"), py::arg("dv_ref"), py::arg("dx"), py::arg("num_threads"));
  cpu.def(
      "convert_storage",
      [](int src_type, std::uintptr_t src, int dst_type, std::uintptr_t dst, int64_t count) {
        sfgrpo::convert_storage_cpu(storage(src_type), reinterpret_cast<const void*>(src),
                                    storage(dst_type), reinterpret_cast<void*>(dst), count);
      },
      "Converts between storage types with torch's rounding (tests)", py::arg("src_type"),
      py::arg("src"), py::arg("dst_type"), py::arg("dst"), py::arg("count"));

  py::module_ testing = m.def_submodule("testing", "Test helpers");
  testing.def(
      "advantages_cuda_emulated",
      [](const std::string& dtype, std::uintptr_t rewards, std::uintptr_t group_ids,
         std::uintptr_t out, int64_t rows, int64_t width, bool gains, bool pooled, bool global_std,
         int ddof, double eps, std::optional<double> clip, std::uintptr_t column_mask,
         std::optional<StatsAddresses> stats, bool as_launched, int max_blocks) {
        return run_host_advantages(
            dtype, rewards, group_ids, out,
            make_problem(rows, width, gains, pooled, global_std, ddof, eps, clip, column_mask),
            make_stats(stats), [&](const auto& p, const auto* r, const int64_t* ids, auto* o, const auto& b) {
              return sfgrpo::advantages_cuda_emulated(p, r, ids, o, b, as_launched, max_blocks);
            });
      },
      "The CUDA engine's algorithm run sequentially on host memory (the GPU's bits); returns "
      "(groups, nonfinite rows). as_launched=False: phases 1 and 2 without the kernel's blocks and "
      "shared-memory staging (the same bits); max_blocks > 0 caps the grid like the cooperative "
      "single launch",
      py::arg("dtype"), py::arg("rewards"), py::arg("group_ids"), py::arg("out"), py::arg("rows"),
      py::arg("width"), py::arg("gains"), py::arg("pooled"), py::arg("global_std"),
      py::arg("ddof"), py::arg("eps"), py::arg("clip"), py::arg("column_mask"), py::arg("stats"),
      py::arg("as_launched") = true, py::arg("max_blocks") = 0);

  testing.def(
      "advantages_launch",
      [](int64_t rows, int64_t width, bool gains, bool pooled, bool global_std) {
        namespace fx = sfgrpo::fixed;
        const auto p = make_problem(rows, width, gains, pooled, global_std, 0, 0.0, {}, 0);
        const int blocks = fx::blocks_for(rows);
        const int64_t per_round = int64_t{blocks} * fx::kThreads;
        return py::dict(py::arg("threads") = fx::kThreads, py::arg("blocks") = blocks,
                        py::arg("rounds") = (rows + per_round - 1) / per_round,
                        py::arg("insert_batch_words") = fx::staged_batch_words(p, true),
                        py::arg("moments_batch_words") = fx::staged_batch_words(p, false),
                        py::arg("stage_bytes_float32") = fx::stage_bytes(p, sizeof(float)),
                        py::arg("stage_bytes_float64") = fx::stage_bytes(p, sizeof(double)));
      },
      "The CUDA advantage engine's launch of phases 1 and 2 (the emulation runs the same): threads "
      "per block, blocks, grid-stride rounds, batch words each phase stages in shared memory, the "
      "bytes of a block's staged rows (0: read from global memory) for float32 and float64 rewards",
      py::arg("rows"), py::arg("width"), py::arg("gains"), py::arg("pooled"), py::arg("global_std"));

  testing.def(
      "warp_runs",
      [](const std::vector<int64_t>& keys, int active, const std::vector<uint64_t>& values, bool maximum) {
        namespace fx = sfgrpo::fixed;
        if (keys.size() != fx::kWarpSize || values.size() != fx::kWarpSize || active < 0 || active > fx::kWarpSize) {
          throw std::invalid_argument("warp_runs: 32 keys, 32 values, 0 <= active <= 32");
        }
        fx::Lanes<int64_t> key;
        fx::Lanes<bool> on;
        fx::Lanes<uint64_t> v[1];
        for (int lane = 0; lane < fx::kWarpSize; ++lane) {
          key[lane] = keys[lane];
          on[lane] = lane < active;
          v[0][lane] = values[lane];
        }
        const fx::Runs runs = fx::runs_of(key, on);
        if (maximum) {
          fx::reduce_runs(runs, v, fx::MaxOp{});
        } else {
          fx::reduce_runs(runs, v, fx::AddOp{});
        }
        std::vector<int> head(fx::kWarpSize), span(fx::kWarpSize);
        std::vector<uint64_t> reduced(fx::kWarpSize);
        for (int lane = 0; lane < fx::kWarpSize; ++lane) {
          head[lane] = runs.head[lane];
          span[lane] = runs.span[lane];
          reduced[lane] = v[0][lane];
        }
        return py::make_tuple(runs.heads, head, span, reduced);
      },
      "The advantage engine's warp runs on 32 lanes (emulated): (heads mask, head lane, span, values "
      "reduced over each run, valid at the run's first lane)",
      py::arg("keys"), py::arg("active"), py::arg("values"), py::arg("maximum"));
  testing.def(
      "u128_to_double", [](uint64_t hi, uint64_t lo) { return sfgrpo::fixed::to_double(sfgrpo::fixed::U128{lo, hi}); },
      "hi * 2^64 + lo rounded to a double as the advantage engine rounds it", py::arg("hi"), py::arg("lo"));

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
      [](int64_t rows, int64_t width, bool gains, bool pooled, bool with_stats) {
        const auto problem = make_problem(rows, width, gains, pooled, false, 0, 0.0, {}, 0);
        return sfgrpo::advantages_cuda_workspace_bytes(problem, with_stats);
      },
      "Bytes of scratch memory advantages() needs", py::arg("rows"), py::arg("width"),
      py::arg("gains"), py::arg("pooled"), py::arg("with_stats"));
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
