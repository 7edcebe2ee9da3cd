// CPU implementation: OpenMP over fixed-size chunks, inner loops over one group's
// segment that the compiler vectorises (no branches, only selects), stats summed per
// thread in double (the reference sums fp32 terms in fp64 and rounds once) and
// reduced in thread order at the end, so a result does not depend on scheduling.
// Built with -ffp-contract=off: fp32 results are then those of ops/reference.py.
//
// Compiled once per instruction set (ops_cpu_avx2.cpp includes this file with
// AIM_CPU_NS=isa_avx2 and -mavx2); ops_cpu_dispatch.cpp picks one at run time, so a
// wheel runs on any x86-64 and uses 256-bit vectors where the CPU has them.
#ifndef AIM_CPU_NS
#define AIM_CPU_NS isa_default
#endif

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "aim_math.h"
#include "ops.h"
#include "select.h"

namespace aim {
namespace AIM_CPU_NS {
namespace {

constexpr int64_t kChunk = int64_t(1) << 15;   // elements per scheduling unit
// Below this many elements one thread does the work: waking a team (whose threads may
// be spinning in, or descheduled by, other work on a small shared machine) costs more.
constexpr int64_t kSerialBelow = int64_t(1) << 18;

// Group of element `i`: the g with offsets[g] <= i < offsets[g+1] (empty groups skipped).
inline int64_t group_of(const int64_t* offsets, int64_t groups, int64_t i) {
  return int64_t(std::upper_bound(offsets + 1, offsets + groups + 1, i) - (offsets + 1));
}

// Calls f(lo, hi, g) for every maximal run of elements of one group inside [lo, hi).
template <typename F>
inline void for_segments(const int64_t* offsets, int64_t groups, int64_t lo, int64_t hi, F&& f) {
  int64_t g = group_of(offsets, groups, lo);
  while (lo < hi) {
    while (offsets[g + 1] <= lo) ++g;
    const int64_t end = std::min(hi, offsets[g + 1]);
    f(lo, end, g);
    lo = end;
  }
}

// The team size is cpu_threads(), the count Python sized the per-thread scratch by.
template <typename F>
inline void parallel_chunks(int64_t n, F&& f) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int threads = cpu_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= kSerialBelow)
  for (int64_t c = 0; c < chunks; ++c) f(omp_get_thread_num(), c * kChunk, std::min(n, (c + 1) * kChunk));
}

// ------------------------------------------------------------------ fused step

template <typename T, typename S>
void step_segment(const StepArgs& a, const StepScalars& k, int64_t lo, int64_t hi, int64_t g,
                  double* acc) {
  T* __restrict grad = static_cast<T*>(a.grad);
  const T* __restrict param = static_cast<const T*>(a.param);
  const T* __restrict anchor = static_cast<const T*>(a.anchor);
  const S* __restrict imp = static_cast<const S*>(a.importance);
  S* __restrict fisher = static_cast<S*>(a.fisher);
  const GroupScalars gs{a.inv_scale[g], a.thresh[g], a.keep[g], a.lam[g], 0.5f * a.lam[g]};
  double grad_sq = 0, out_sq = 0, reg_sq = 0, drift_sq = 0, penalty = 0;
  int64_t masked = 0, nonfinite = 0;
#pragma omp simd reduction(+ : grad_sq, out_sq, reg_sq, drift_sq, penalty, masked, nonfinite)
  for (int64_t i = lo; i < hi; ++i) {
    const T g_raw = grad[i];
    const S F_raw = fisher[i];
    const StepOut o = step_element(load(g_raw), load(param[i]), load(anchor[i]), load(imp[i]),
                                   load(F_raw), k, gs);
    grad[i] = o.finite ? store<T>(o.g_out) : g_raw;     // non-finite g: bit for bit
    fisher[i] = o.finite ? store<S>(o.F_new) : F_raw;
    grad_sq += double(o.grad_sq);
    out_sq += double(o.out_sq);
    reg_sq += double(o.reg_sq);
    drift_sq += double(o.drift_sq);
    penalty += double(o.penalty);
    masked += o.masked ? 1 : 0;
    nonfinite += o.finite ? 0 : 1;
  }
  double* s = acc + g * 7;
  s[0] += grad_sq; s[1] += out_sq; s[2] += reg_sq; s[3] += drift_sq; s[4] += penalty;
  s[5] += double(masked); s[6] += double(nonfinite);
}

template <typename T, typename S>
void fused_step_impl(const StepArgs& a) {
  const StepScalars k{float(a.beta), float(1.0 - a.beta), a.ema, a.fisher_kind, a.directional};
  const int threads = cpu_threads();
  const int64_t G = a.groups;
  std::fill(a.scratch, a.scratch + int64_t(threads) * G * 7, 0.0);
  parallel_chunks(a.n, [&](int t, int64_t lo, int64_t hi) {
    double* acc = a.scratch + int64_t(t) * G * 7;
    for_segments(a.offsets, G, lo, hi, [&](int64_t s, int64_t e, int64_t g) {
      step_segment<T, S>(a, k, s, e, g, acc);
    });
  });
  for (int64_t j = 0; j < G * 7; ++j) {
    double total = 0;
    for (int t = 0; t < threads; ++t) total += a.scratch[int64_t(t) * G * 7 + j];
    a.stats[j] = float(total);
  }
}

// ------------------------------------------------------------------ radix select

// Exact k-th largest |x| of x[0, n) as fp32 bits, 1 <= k <= n. `hist` holds
// threads x kBins counters.
template <typename T>
uint32_t kth_largest_bits(const T* x, int64_t n, int64_t k, int64_t* hist) {
  const int threads = cpu_threads();
  select::State st{0u, k};
  for (int pass = 0; pass < select::kPasses; ++pass) {
    std::fill(hist, hist + int64_t(threads) * select::kBins, int64_t(0));
    const uint32_t prefix = st.prefix;
    parallel_chunks(n, [&](int t, int64_t lo, int64_t hi) {
      int64_t* h = hist + int64_t(t) * select::kBins;
      for (int64_t i = lo; i < hi; ++i) {
        const uint32_t bits = abs_bits(load(x[i]));
        if (select::in_prefix(bits, prefix, pass)) ++h[select::digit_of(bits, pass)];
      }
    });
    for (int t = 1; t < threads; ++t)
      for (int b = 0; b < select::kBins; ++b) hist[b] += hist[int64_t(t) * select::kBins + b];
    select::walk(st, pass, [&](int d) { return hist[d]; });
  }
  return st.prefix;
}

template <typename T>
double sum_of(const T* x, int64_t n) {
  double total = 0;
  const int threads = cpu_threads();
#pragma omp parallel for simd reduction(+ : total) schedule(static) num_threads(threads) \
    if (n >= kSerialBelow)
  for (int64_t i = 0; i < n; ++i) total += double(load(x[i]));
  return total;
}

template <typename T>
void thresholds_impl(const ThresholdArgs& a) {
  const T* x = static_cast<const T*>(a.importance);
  int64_t* hist = static_cast<int64_t*>(a.scratch);
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t lo = a.offsets[g], n = a.offsets[g + 1] - lo;
    const int64_t k = n ? select::kth_count(a.ratios ? a.ratios[g] : a.ratio, n) : 0;
    if (k > n) throw std::invalid_argument("k-th largest: k exceeds the group's size");
    const uint32_t bits = k > 0 ? kth_largest_bits(x + lo, n, k, hist) : 0u;
    a.thresh[g] = select::result(bits, k <= 0);
    if (a.inv_scale) {
      const double total = n ? sum_of(x + lo, n) : 0.0;
      a.inv_scale[g] = inv_scale_of(double(n), total, a.normalize);
    }
  }
}

// ------------------------------------------------------------------ consolidation

template <typename T, typename S>
void consolidate_impl(const ConsolidateArgs& a) {
  T* __restrict param = static_cast<T*>(a.param);
  T* __restrict anchor = static_cast<T*>(a.anchor);
  S* __restrict imp = static_cast<S*>(a.importance);
  S* __restrict fisher = static_cast<S*>(a.fisher);
  const ConsolidateScalars k{float(a.fisher_scale), float(a.decay), float(a.alpha), a.merge};
  const bool keep_theta = a.merge == kMergeNone;
  parallel_chunks(a.n, [&](int, int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const T theta_raw = param[i];
      const ConsolidateOut o = consolidate_element(load(theta_raw), load(anchor[i]),
                                                   load(imp[i]), load(fisher[i]), k);
      // merge=None leaves theta's bits as they are; a = theta as stored
      const T theta = keep_theta ? theta_raw : store<T>(o.theta);
      param[i] = theta;
      anchor[i] = theta;
      imp[i] = store<S>(o.omega);
      fisher[i] = store<S>(0.0f);
    }
  });
}

// ------------------------------------------------------------------ alignment

template <typename T>
void align_impl(const AlignArgs& a) {
  ThresholdArgs t{a.anchor, a.dtype, a.offsets, a.n, a.groups, nullptr, a.ratio, false,
                  nullptr, a.thresh, a.scratch};
  thresholds_impl<T>(t);
  T* __restrict param = static_cast<T*>(a.param);
  const T* __restrict anchor = static_cast<const T*>(a.anchor);
  const T zero = store<T>(0.0f);
  parallel_chunks(a.n, [&](int, int64_t lo, int64_t hi) {
    for_segments(a.offsets, a.groups, lo, hi, [&](int64_t s, int64_t e, int64_t g) {
      const float m = a.thresh[g];
#pragma omp simd
      for (int64_t i = s; i < e; ++i) {
        const T theta = param[i];
        const bool reset = align_conflict(load(theta), load(anchor[i]), m);
        param[i] = reset ? (a.zero_mode ? zero : anchor[i]) : theta;
      }
    });
  });
}

// ------------------------------------------------------------------ dtype dispatch

template <template <typename> class Fn, typename... Args>
void by_dtype(int code, Args&&... args) {
  switch (code) {
    case kF32: return Fn<float>::run(args...);
    case kBF16: return Fn<bf16_t>::run(args...);
    case kF16: return Fn<f16_t>::run(args...);
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(code));
}

template <typename T> struct StepFn {
  template <typename S> struct Inner { static void run(const StepArgs& a) { fused_step_impl<T, S>(a); } };
  static void run(const StepArgs& a) { by_dtype<Inner>(a.state_dtype, a); }
};
template <typename T> struct ConsolidateFn {
  template <typename S> struct Inner {
    static void run(const ConsolidateArgs& a) { consolidate_impl<T, S>(a); }
  };
  static void run(const ConsolidateArgs& a) { by_dtype<Inner>(a.state_dtype, a); }
};
template <typename T> struct ThresholdsFn { static void run(const ThresholdArgs& a) { thresholds_impl<T>(a); } };
template <typename T> struct AlignFn { static void run(const AlignArgs& a) { align_impl<T>(a); } };

}  // namespace

void fused_step(const StepArgs& a) { by_dtype<StepFn>(a.dtype, a); }
void group_thresholds(const ThresholdArgs& a) { by_dtype<ThresholdsFn>(a.state_dtype, a); }
void consolidate(const ConsolidateArgs& a) { by_dtype<ConsolidateFn>(a.dtype, a); }
void align(const AlignArgs& a) { by_dtype<AlignFn>(a.dtype, a); }

}  // namespace AIM_CPU_NS
}  // namespace aim
