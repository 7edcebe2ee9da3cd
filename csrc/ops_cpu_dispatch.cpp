// Picks the CPU code for this machine's instruction set once: AVX-512 where the CPU has
// it, else AVX2 where it has that, else the baseline x86-64 build; AIM_CPU_ISA
// ("default", "avx2", "avx512") caps the choice.
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
#ifdef AIM_CPU_AVX512
AIM_DECLARE_ISA(isa_avx512)
#endif

namespace {

bool has_avx2() {
#if defined(AIM_CPU_AVX2) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

bool has_avx512() {
#if defined(AIM_CPU_AVX512) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool available(const std::string& name) {
  return name == "default" || (name == "avx2" && has_avx2()) ||
         (name == "avx512" && has_avx512());
}

std::string& isa() {
  static std::string current = [] {
    const std::string best = has_avx512() ? "avx512" : (has_avx2() ? "avx2" : "default");
    const char* env = std::getenv("AIM_CPU_ISA");
    if (!env) return best;
    const std::string want(env);
    if (want == "default" || (want == "avx2" && best != "default")) return want;
    return best;
  }();
  return current;
}

}  // namespace

std::string cpu_isa() { return isa(); }

void set_cpu_isa(const std::string& name) {
  if (!available(name))
    throw std::invalid_argument("CPU code path '" + name + "' is not available here");
  isa() = name;
}

int cpu_threads() { return std::max(1, omp_get_max_threads()); }

// Per thread and group a histogram and a sum; per group a select state (ops_cpu.cpp).
size_t cpu_threshold_scratch_bytes(int64_t groups) {
  const size_t g = size_t(std::max<int64_t>(groups, 1));
  return size_t(cpu_threads()) * g * (select::kBins * sizeof(int64_t) + sizeof(double)) +
         g * sizeof(select::State);
}

// One string comparison per call: nothing next to the pass over the data.
#if defined(AIM_CPU_AVX512)
#define AIM_DISPATCH(fn, a)                                   \
  {                                                           \
    const std::string& name = isa();                          \
    if (name == "avx512") return isa_avx512::fn(a);           \
    if (name == "avx2") return isa_avx2::fn(a);               \
    return isa_default::fn(a);                                \
  }
#elif defined(AIM_CPU_AVX2)
#define AIM_DISPATCH(fn, a) return isa() == "avx2" ? isa_avx2::fn(a) : isa_default::fn(a)
#else
#define AIM_DISPATCH(fn, a) return isa_default::fn(a)
#endif

void cpu_fused_step(const StepArgs& a) { AIM_DISPATCH(fused_step, a); }
void cpu_group_thresholds(const ThresholdArgs& a) { AIM_DISPATCH(group_thresholds, a); }
void cpu_consolidate(const ConsolidateArgs& a) { AIM_DISPATCH(consolidate, a); }
void cpu_align(const AlignArgs& a) { AIM_DISPATCH(align, a); }
void cpu_align_apply(const AlignArgs& a) { AIM_DISPATCH(align_apply, a); }

}  // namespace aim
