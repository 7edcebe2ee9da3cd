// aim_kernels._C: the ops of csrc/ on raw pointers. No libtorch: tensors cross as
// (address, dtype code) pairs and the CUDA stream as a handle, which is what lets one
// build serve every torch version. aim_kernels/ops/native.py checks every tensor
// before its address gets here; the GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "aim_math.h"
#include "ops.h"
#include "select.h"

namespace py = pybind11;
using aim::AlignArgs;
using aim::ConsolidateArgs;
using aim::StepArgs;
using aim::ThresholdArgs;

namespace {

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

StepArgs step_args(uintptr_t grad, uintptr_t param, uintptr_t anchor, uintptr_t importance,
                   uintptr_t fisher, uintptr_t offsets, uintptr_t inv_scale, uintptr_t thresh,
                   uintptr_t keep, uintptr_t lam, uintptr_t stats, uintptr_t scratch, int64_t n,
                   int64_t groups, int dtype, int state_dtype, double beta, bool ema,
                   bool fisher_kind, bool directional) {
  return StepArgs{ptr<void>(grad), ptr<const void>(param), ptr<const void>(anchor),
                  ptr<const void>(importance), ptr<void>(fisher), ptr<const int64_t>(offsets),
                  ptr<const float>(inv_scale), ptr<const float>(thresh), ptr<const float>(keep),
                  ptr<const float>(lam), ptr<float>(stats), ptr<double>(scratch), n, groups,
                  dtype, state_dtype, beta, ema, fisher_kind, directional};
}

ThresholdArgs threshold_args(uintptr_t importance, int state_dtype, uintptr_t offsets, int64_t n,
                             int64_t groups, uintptr_t ratios, bool normalize,
                             uintptr_t inv_scale, uintptr_t thresh, uintptr_t scratch) {
  return ThresholdArgs{ptr<const void>(importance), state_dtype, ptr<const int64_t>(offsets), n,
                       groups, ptr<const double>(ratios), 0.0, normalize, ptr<float>(inv_scale),
                       ptr<float>(thresh), ptr<void>(scratch)};
}

ConsolidateArgs consolidate_args(uintptr_t param, uintptr_t anchor, int dtype,
                                 uintptr_t importance, uintptr_t fisher, int state_dtype,
                                 int64_t n, double fisher_scale, double decay, double alpha,
                                 int merge) {
  return ConsolidateArgs{ptr<void>(param), ptr<void>(anchor), dtype, ptr<void>(importance),
                         ptr<void>(fisher), state_dtype, n, fisher_scale, decay, alpha, merge};
}

AlignArgs align_args(uintptr_t param, uintptr_t anchor, int dtype, uintptr_t offsets, int64_t n,
                     int64_t groups, double ratio, bool zero_mode, uintptr_t thresh,
                     uintptr_t scratch) {
  return AlignArgs{ptr<void>(param), ptr<const void>(anchor), dtype, ptr<const int64_t>(offsets),
                   n, groups, ratio, zero_mode, ptr<float>(thresh), ptr<void>(scratch)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "aim_kernels native ops (CPU, and CUDA when built with nvcc); see ops/native.py";
  py::options options;
  options.disable_function_signatures();
  auto nogil = py::call_guard<py::gil_scoped_release>();

#ifdef AIM_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("dtype_codes") = py::dict(py::arg("float32") = int(aim::kF32),
                                   py::arg("bfloat16") = int(aim::kBF16),
                                   py::arg("float16") = int(aim::kF16));
  m.attr("merge_codes") = py::dict(py::arg("none") = int(aim::kMergeNone),
                                   py::arg("fisher") = int(aim::kMergeFisher),
                                   py::arg("linear") = int(aim::kMergeLinear));
  m.attr("select_bins") = aim::select::kBins;

  m.def("cpu_threads", &aim::cpu_threads, "OpenMP team size (the rows of the step scratch)");
  m.def("cpu_isa", &aim::cpu_isa, "the CPU code path in use: avx2 or default");
  m.def("set_cpu_isa", &aim::set_cpu_isa, "pick the CPU code path (tests, benchmarks)");
  m.def("cpu_threshold_scratch_bytes", &aim::cpu_threshold_scratch_bytes);
  m.def("cpu_fused_step", [](uintptr_t grad, uintptr_t param, uintptr_t anchor,
                             uintptr_t importance, uintptr_t fisher, uintptr_t offsets,
                             uintptr_t inv_scale, uintptr_t thresh, uintptr_t keep, uintptr_t lam,
                             uintptr_t stats, uintptr_t scratch, int64_t n, int64_t groups,
                             int dtype, int state_dtype, double beta, bool ema, bool fisher_kind,
                             bool directional) {
    aim::cpu_fused_step(step_args(grad, param, anchor, importance, fisher, offsets, inv_scale,
                                  thresh, keep, lam, stats, scratch, n, groups, dtype,
                                  state_dtype, beta, ema, fisher_kind, directional));
  }, nogil);
  m.def("cpu_group_thresholds", [](uintptr_t importance, int state_dtype, uintptr_t offsets,
                                   int64_t n, int64_t groups, uintptr_t ratios, bool normalize,
                                   uintptr_t inv_scale, uintptr_t thresh, uintptr_t scratch) {
    aim::cpu_group_thresholds(threshold_args(importance, state_dtype, offsets, n, groups, ratios,
                                             normalize, inv_scale, thresh, scratch));
  }, nogil);
  m.def("cpu_consolidate", [](uintptr_t param, uintptr_t anchor, int dtype, uintptr_t importance,
                              uintptr_t fisher, int state_dtype, int64_t n, double fisher_scale,
                              double decay, double alpha, int merge) {
    aim::cpu_consolidate(consolidate_args(param, anchor, dtype, importance, fisher, state_dtype,
                                          n, fisher_scale, decay, alpha, merge));
  }, nogil);
  m.def("cpu_align", [](uintptr_t param, uintptr_t anchor, int dtype, uintptr_t offsets,
                        int64_t n, int64_t groups, double ratio, bool zero_mode, uintptr_t thresh,
                        uintptr_t scratch) {
    aim::cpu_align(align_args(param, anchor, dtype, offsets, n, groups, ratio, zero_mode, thresh,
                              scratch));
  }, nogil);
  // align_ given m_g ([G] fp32 at `m_g`): the resets only, no select
  m.def("cpu_align_apply", [](uintptr_t param, uintptr_t anchor, int dtype, uintptr_t offsets,
                              int64_t n, int64_t groups, uintptr_t m_g, bool zero_mode) {
    aim::cpu_align_apply(align_args(param, anchor, dtype, offsets, n, groups, 0.0, zero_mode,
                                    m_g, 0));
  }, nogil);

#ifdef AIM_WITH_CUDA
  // Driver queries are lazy: importing this module never touches the driver, so it
  // imports on a machine without a GPU (the CUDA runtime is linked statically).
  m.def("cuda_runtime_version", &aim::cuda_runtime_version);
  m.def("cuda_driver_version", &aim::cuda_driver_version, nogil);
  m.def("cuda_device_count", &aim::cuda_device_count, nogil);
  m.def("cuda_probe", &aim::cuda_probe, nogil);
  m.def("cuda_archs", &aim::cuda_archs);
  m.def("cuda_threshold_scratch_bytes", &aim::cuda_threshold_scratch_bytes);
  m.def("cuda_fused_step", [](uintptr_t grad, uintptr_t param, uintptr_t anchor,
                              uintptr_t importance, uintptr_t fisher, uintptr_t offsets,
                              uintptr_t inv_scale, uintptr_t thresh, uintptr_t keep,
                              uintptr_t lam, uintptr_t stats, uintptr_t scratch, int64_t n,
                              int64_t groups, int dtype, int state_dtype, double beta, bool ema,
                              bool fisher_kind, bool directional, int device, uintptr_t stream) {
    aim::cuda_fused_step(step_args(grad, param, anchor, importance, fisher, offsets, inv_scale,
                                   thresh, keep, lam, stats, scratch, n, groups, dtype,
                                   state_dtype, beta, ema, fisher_kind, directional),
                         device, ptr<void>(stream));
  }, nogil);
  m.def("cuda_group_thresholds", [](uintptr_t importance, int state_dtype, uintptr_t offsets,
                                    int64_t n, int64_t groups, uintptr_t ratios, bool normalize,
                                    uintptr_t inv_scale, uintptr_t thresh, uintptr_t scratch,
                                    int device, uintptr_t stream) {
    aim::cuda_group_thresholds(threshold_args(importance, state_dtype, offsets, n, groups, ratios,
                                              normalize, inv_scale, thresh, scratch),
                               device, ptr<void>(stream));
  }, nogil);
  m.def("cuda_consolidate", [](uintptr_t param, uintptr_t anchor, int dtype, uintptr_t importance,
                               uintptr_t fisher, int state_dtype, int64_t n, double fisher_scale,
                               double decay, double alpha, int merge, int device,
                               uintptr_t stream) {
    aim::cuda_consolidate(consolidate_args(param, anchor, dtype, importance, fisher, state_dtype,
                                           n, fisher_scale, decay, alpha, merge),
                          device, ptr<void>(stream));
  }, nogil);
  m.def("cuda_kernel_count", &aim::cuda_kernel_count);
  m.def("cuda_align_apply", [](uintptr_t param, uintptr_t anchor, int dtype, uintptr_t offsets,
                               int64_t n, int64_t groups, uintptr_t m_g, bool zero_mode,
                               int device, uintptr_t stream) {
    aim::cuda_align_apply(align_args(param, anchor, dtype, offsets, n, groups, 0.0, zero_mode,
                                     m_g, 0),
                          device, ptr<void>(stream));
  }, nogil);
  m.def("cuda_align", [](uintptr_t param, uintptr_t anchor, int dtype, uintptr_t offsets,
                         int64_t n, int64_t groups, double ratio, bool zero_mode,
                         uintptr_t thresh, uintptr_t scratch, int device, uintptr_t stream) {
    aim::cuda_align(align_args(param, anchor, dtype, offsets, n, groups, ratio, zero_mode, thresh,
                               scratch),
                    device, ptr<void>(stream));
  }, nogil);
#endif
}
