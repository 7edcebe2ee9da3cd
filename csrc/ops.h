// The four ops of DESIGN.md 3 on raw pointers, as python/bindings.cpp exposes them.
// Python (aim_kernels/ops/native.py) has checked every pointer (device, dtype,
// contiguity, length, alignment) and allocated every output and scratch buffer:
// nothing here allocates, so a CUDA graph can capture a step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace aim {

struct StepArgs {
  void* grad; const void* param; const void* anchor;     // dtype
  const void* importance; void* fisher;                  // state_dtype
  const int64_t* offsets;                                // [G+1]
  const float* inv_scale; const float* thresh; const float* keep; const float* lam;  // [G]
  float* stats;                                          // out [G, 7]
  double* scratch;   // cpu: [threads, G, 7]; cuda: [G, 7] (zeroed here, on the stream)
  int64_t n, groups;
  int dtype, state_dtype;
  double beta;
  bool ema, fisher_kind, directional;
};

struct ThresholdArgs {
  const void* importance; int state_dtype;               // values to rank (|x|)
  const int64_t* offsets; int64_t n, groups;
  const double* ratios;     // [G] fp64 (mask_ratio); null: `ratio` for every group
  double ratio;
  bool normalize;
  float* inv_scale;         // out [G], may be null (align_ needs thresholds only)
  float* thresh;            // out [G]
  void* scratch;            // threshold_scratch_bytes(...)
};

struct ConsolidateArgs {
  void* param; void* anchor; int dtype;
  void* importance; void* fisher; int state_dtype;
  int64_t n;
  double fisher_scale, decay, alpha;
  int merge;                // aim::Merge
};

struct AlignArgs {
  void* param; const void* anchor; int dtype;
  const int64_t* offsets; int64_t n, groups;
  double ratio;
  bool zero_mode;           // theta = 0 instead of theta = a
  float* thresh;            // align: scratch out [G], m_g; align_apply: in [G], m_g
  void* scratch;            // threshold_scratch_bytes(...) (align only)
};

// ---------------------------------------------------------------- CPU (ops_cpu*.cpp)
int cpu_threads();
std::string cpu_isa();                       // "avx2" or "default": the code path in use
void set_cpu_isa(const std::string& name);   // for tests and benchmarks
size_t cpu_threshold_scratch_bytes(int64_t groups);
void cpu_fused_step(const StepArgs& a);                  // scratch: [threads, G, 7]
void cpu_group_thresholds(const ThresholdArgs& a);
void cpu_consolidate(const ConsolidateArgs& a);
void cpu_align(const AlignArgs& a);
void cpu_align_apply(const AlignArgs& a);             // m_g given in a.thresh

// ---------------------------------------------------------------- CUDA (ops_cuda.cu)
#ifdef AIM_WITH_CUDA
int cuda_runtime_version();             // CUDART_VERSION this module was built with
int cuda_driver_version();              // 0 when no driver is installed
int cuda_device_count();                // 0 when none (or no driver)
std::string cuda_probe(int device);     // "" when the kernels can run on `device`, else why
std::string cuda_archs();               // the architectures compiled in
int cuda_kernel_count();                 // kernels (instantiations) the probe loads
// bytes of the select scratch; its histogram part must be zero on entry and is left zero
size_t cuda_threshold_scratch_bytes(int64_t groups);
void cuda_fused_step(const StepArgs& a, int device, void* stream);   // scratch: [G, 7]
void cuda_group_thresholds(const ThresholdArgs& a, int device, void* stream);
void cuda_consolidate(const ConsolidateArgs& a, int device, void* stream);
void cuda_align(const AlignArgs& a, int device, void* stream);
void cuda_align_apply(const AlignArgs& a, int device, void* stream);   // m_g in a.thresh
#endif

}  // namespace aim
