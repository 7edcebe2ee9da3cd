// Picks the CPU code for this machine's instruction set once: AVX2 where the CPU has
// it (and AIM_CPU_ISA does not say "default"), else the baseline x86-64 build.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ops.h"
#include "select.h"

namespace aim {

#define AIM_DECLARE_ISA(ns)                         \
  namespace ns {                                    \
  void fused_step(const StepArgs&);                 \
  void group_thresholds(const ThresholdArgs&);      \
  void consolidate(const ConsolidateArgs&);         \
  void align(const AlignArgs&);                     \
  void align_apply(const AlignArgs&);               \
  }
AIM_DECLARE_ISA(isa_default)
#ifdef AIM_CPU_AVX2
AIM_DECLARE_ISA(isa_avx2)
#endif

namespace {

bool has_avx2() {
#if defined(AIM_CPU_AVX2) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

std::string& isa() {
  static std::string current = [] {
    const char* env = std::getenv("AIM_CPU_ISA");
    if (env && std::strcmp(env, "default") == 0) return std::string("default");
    return std::string(has_avx2() ? "avx2" : "default");
  }();
  return current;
}

bool avx2() { return isa() == "avx2"; }

}  // namespace

std::string cpu_isa() { return isa(); }

void set_cpu_isa(const std::string& name) {
  if (name != "default" && !(name == "avx2" && has_avx2()))
    throw std::invalid_argument("CPU code path '" + name + "' is not available here");
  isa() = name;
}

int cpu_threads() { return std::max(1, omp_get_max_threads()); }

size_t cpu_threshold_scratch_bytes(int64_t) {
  return size_t(cpu_threads()) * select::kBins * sizeof(int64_t);
}

#ifdef AIM_CPU_AVX2
#define AIM_DISPATCH(fn, a) return avx2() ? isa_avx2::fn(a) : isa_default::fn(a)
#else
#define AIM_DISPATCH(fn, a) return isa_default::fn(a)
#endif

void cpu_fused_step(const StepArgs& a) { AIM_DISPATCH(fused_step, a); }
void cpu_group_thresholds(const ThresholdArgs& a) { AIM_DISPATCH(group_thresholds, a); }
void cpu_consolidate(const ConsolidateArgs& a) { AIM_DISPATCH(consolidate, a); }
void cpu_align(const AlignArgs& a) { AIM_DISPATCH(align, a); }
void cpu_align_apply(const AlignArgs& a) { AIM_DISPATCH(align_apply, a); }

}  // namespace aim
