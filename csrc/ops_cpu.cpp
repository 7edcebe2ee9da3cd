// CPU implementation: OpenMP over fixed-size chunks, inner loops over one group's
// segment that the compiler vectorises (no branches, only selects and blends), stats
// summed in fp32 lane partials of at most 16 terms, then in double per thread, reduced
// in thread order at the end, so a result does not depend on scheduling (the reference
// sums the fp32 terms in fp64 and rounds once: the bound is below, at the fused step).
// Built with -ffp-contract=off: fp32 results are then those of ops/reference.py.
//
// Compiled once per instruction set (ops_cpu_avx2.cpp and ops_cpu_avx512.cpp include
// this file with AIM_CPU_NS=isa_avx2 / isa_avx512 and their -m flags);
// ops_cpu_dispatch.cpp picks one at run time, so a wheel runs on any x86-64 and uses
// 256- or 512-bit vectors where the CPU has them.
#ifndef AIM_CPU_NS
#define AIM_CPU_NS isa_default
#endif

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "aim_math.h"
#include "ops.h"
#include "select.h"
#include "select_window_cpu.h"

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

// The stats are summed in fp32 lane partials, then in double: Lanes partials per stat,
// each taking at most kTermsPerLane terms of a block before it is added into the
// double sums. Any order of m fp32 additions errs by at most (m - 1) 2^-24 of the sum
// of |terms|, so a stat differs from the reference's double sum by at most
// 15 * 2^-24 (< 1e-6) of the sum of |terms| of its group, plus the final rounding to
// fp32 (tests/test_native.py STATS_ABS_RTOL). A block whose partials are not all finite
// is summed again in double. The fp32 partials keep the loop in full-width vectors;
// double accumulators (half-width, a conversion per term) made it compute-bound. Counts
// are int32 per lane per block, int64 across blocks: exact.
constexpr int kTermsPerLane = 16;
#if defined(__AVX512F__)
constexpr int kVectorFloats = 16;
#elif defined(__AVX2__)
constexpr int kVectorFloats = 8;
#else
constexpr int kVectorFloats = 4;
#endif

// Lanes per loop step: one vector of fp32, or two when g, theta, a or the state are
// 16-bit, so that those load and store whole vectors (with one, GCC split the fp32
// math into half-width vectors to match the 16-bit ones).
template <typename T, typename S>
constexpr int lanes_of() {
  return (sizeof(T) == 4 && sizeof(S) == 4) ? kVectorFloats : 2 * kVectorFloats;
}

// Per-lane fp32 partials and int32 counts of one block.
template <int Lanes>
struct BlockSums {
  alignas(64) float part[5][Lanes];
  alignas(64) int32_t count[2][Lanes];
};

// c ? x : y for a stored value. For the 16-bit types the choice is made with masks on
// the bits: written as a select, GCC moved the conversion of the new value under a
// branch and left the loop scalar.
AIM_HD float pick(bool c, float x, float y) {
  const uint32_t mask = 0u - uint32_t(c);
  return u2f(f2u(y) ^ ((f2u(x) ^ f2u(y)) & mask));
}
AIM_HD uint16_t pick_bits(bool c, uint16_t x, uint16_t y) {
  const uint32_t mask = 0u - uint32_t(c);
  return uint16_t(y ^ ((uint32_t(x) ^ y) & mask));
}
AIM_HD bf16_t pick(bool c, bf16_t x, bf16_t y) { return bf16_t{pick_bits(c, x.x, y.x)}; }
AIM_HD f16_t pick(bool c, f16_t x, f16_t y) { return f16_t{pick_bits(c, x.x, y.x)}; }

// Element i into lane l. The pointers come as __restrict arguments (a lambda capturing
// them by reference lost that, and the loop was not vectorised).
template <int Lanes, typename T, typename S>
AIM_HD void step_one(T* __restrict grad, const T* __restrict param, const T* __restrict anchor,
                     const S* __restrict imp, S* __restrict fisher, int64_t i, int l,
                     const StepScalars& k, const GroupScalars& gs, float (&p0)[Lanes],
                     float (&p1)[Lanes], float (&p2)[Lanes], float (&p3)[Lanes],
                     float (&p4)[Lanes], int32_t (&c0)[Lanes], int32_t (&c1)[Lanes]) {
  const T g_raw = grad[i];
  const S F_raw = fisher[i];
  const StepOut o = step_element(load(g_raw), load(param[i]), load(anchor[i]), load(imp[i]),
                                 load(F_raw), k, gs);
  grad[i] = pick(o.finite, store<T>(o.g_out), g_raw);     // non-finite g: bit for bit
  fisher[i] = pick(o.finite, store<S>(o.F_new), F_raw);
  p0[l] += o.grad_sq;
  p1[l] += o.out_sq;
  p2[l] += o.reg_sq;
  p3[l] += o.drift_sq;
  p4[l] += o.penalty;
  c0[l] += o.masked ? 1 : 0;
  c1[l] += o.finite ? 0 : 1;
}

// Software prefetch of the five streams, kPrefetchAhead elements ahead of the loop (every
// 64-byte line of one loop step). Five read streams are more than the hardware prefetcher
// keeps far enough ahead for one core: with this, a one-thread fused step at 2^24 fp32
// went from 1.29-1.31x to 1.14-1.19x torch's fused AdamW (4 read streams), distances
// 0 and 1-4 KiB of fp32 timed interleaved in one process (load ~9 on 2 cores); 1.5-3 KiB
// were alike, 1 KiB no better than none.
constexpr int64_t kPrefetchAhead = 512;

template <int Lanes, typename X>
AIM_HD void prefetch_lines(const X* p, int64_t i, int rw) {
  constexpr int kBytes = Lanes * int(sizeof(X));
  for (int off = 0; off < kBytes; off += 64) {
    const char* q = reinterpret_cast<const char*>(p + i) + off;
    if (rw) __builtin_prefetch(q, 1); else __builtin_prefetch(q, 0);
  }
}

template <int Lanes, typename T, typename S>
AIM_HD void prefetch_ahead(const T* grad, const T* param, const T* anchor, const S* imp,
                           const S* fisher, int64_t i) {
  prefetch_lines<Lanes>(grad, i, 1);
  prefetch_lines<Lanes>(param, i, 0);
  prefetch_lines<Lanes>(anchor, i, 0);
  prefetch_lines<Lanes>(imp, i, 0);
  prefetch_lines<Lanes>(fisher, i, 1);
}

// Elements [lo, lo + whole) of one block, whole a multiple of Lanes. A function of its
// own: with this loop nest inside step_segment's, GCC 12 did not vectorise it. The
// partials are locals for the loop (through the reference they went to memory and
// back every iteration).
template <typename T, typename S, bool kEma, bool kFisher, bool kDirectional>
__attribute__((noinline)) void step_block(T* __restrict grad, const T* __restrict param,
                                          const T* __restrict anchor, const S* __restrict imp,
                                          S* __restrict fisher, int64_t lo, int64_t whole,
                                          float beta, float one_minus_beta,
                                          const GroupScalars gs,
                                          BlockSums<lanes_of<T, S>()>& out) {
  constexpr int Lanes = lanes_of<T, S>();
  const StepScalars k{beta, one_minus_beta, kEma, kFisher, kDirectional};
  // one array per partial: as members of one struct they stayed in memory, loaded and
  // stored every step (a store-to-load chain per step)
  float p0[Lanes] = {}, p1[Lanes] = {}, p2[Lanes] = {}, p3[Lanes] = {}, p4[Lanes] = {};
  int32_t c0[Lanes] = {}, c1[Lanes] = {};
  for (int64_t j = 0; j < whole; j += Lanes) {
    prefetch_ahead<Lanes>(grad, param, anchor, imp, fisher, lo + j + kPrefetchAhead);
#pragma omp simd
    for (int l = 0; l < Lanes; ++l)
      step_one<Lanes>(grad, param, anchor, imp, fisher, lo + j + l, l, k, gs, p0, p1, p2, p3,
                      p4, c0, c1);
  }
  for (int l = 0; l < Lanes; ++l) {
    out.part[0][l] = p0[l]; out.part[1][l] = p1[l]; out.part[2][l] = p2[l];
    out.part[3][l] = p3[l]; out.part[4][l] = p4[l];
    out.count[0][l] = c0[l]; out.count[1][l] = c1[l];
  }
}

template <typename T, typename S, bool kEma, bool kFisher, bool kDirectional>
void step_segment(const StepArgs& a, const StepScalars& scalars, int64_t lo, int64_t hi,
                  int64_t g, double* acc) {
  T* __restrict grad = static_cast<T*>(a.grad);
  const T* __restrict param = static_cast<const T*>(a.param);
  const T* __restrict anchor = static_cast<const T*>(a.anchor);
  const S* __restrict imp = static_cast<const S*>(a.importance);
  S* __restrict fisher = static_cast<S*>(a.fisher);
  // The flags as constants and the scalars as locals (which the stores through `grad`
  // cannot alias): with them read through a reference every element, the loop stayed
  // scalar, with branches.
  const StepScalars k{scalars.beta, scalars.one_minus_beta, kEma, kFisher, kDirectional};
  const GroupScalars gs{a.inv_scale[g], a.thresh[g], a.keep[g], a.lam[g], 0.5f * a.lam[g]};
  constexpr int Lanes = lanes_of<T, S>();
  constexpr int64_t kBlock = int64_t(Lanes) * kTermsPerLane;
  // Per lane: the double sums of the block partials and the counts (vector adds, no
  // dependency chain from lane to lane); summed over the lanes once per segment.
  alignas(64) double sums[5][Lanes] = {};
  alignas(64) int64_t counts[2][Lanes] = {};
  double extra[5] = {0, 0, 0, 0, 0};       // the blocks summed again in double
  T g_in[kBlock];
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int64_t n = std::min(kBlock, hi - b);
    BlockSums<Lanes> bs;
    // The block's g as read, for the double re-sum below (a separate copy: a store of
    // it inside the loop below kept GCC from vectorising that loop).
    std::memcpy(g_in, grad + b, size_t(n) * sizeof(T));
    const int64_t whole = n - n % Lanes;
    step_block<T, S, kEma, kFisher, kDirectional>(grad, param, anchor, imp, fisher, b, whole,
                                                  k.beta, k.one_minus_beta, gs, bs);
    for (int64_t j = whole; j < n; ++j)
      step_one<Lanes>(grad, param, anchor, imp, fisher, b + j, int(j - whole), k, gs,
                      bs.part[0], bs.part[1], bs.part[2], bs.part[3], bs.part[4], bs.count[0],
                      bs.count[1]);
    uint32_t bad = 0;
    for (int s = 0; s < 5; ++s)
      for (int l = 0; l < Lanes; ++l) bad |= uint32_t(!is_finite(bs.part[s][l]));
    if (!bad) {
      for (int s = 0; s < 5; ++s)
        for (int l = 0; l < Lanes; ++l) sums[s][l] += double(bs.part[s][l]);
    } else {
      // An inf/NaN term, or an fp32 partial that overflowed where the double sum may
      // not (huge penalty terms of both signs): the block's terms again, in double,
      // as the reference sums them. The terms do not depend on F.
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = b + j;
        const StepOut o = step_element(load(g_in[j]), load(param[i]), load(anchor[i]),
                                       load(imp[i]), 0.0f, k, gs);
        extra[0] += double(o.grad_sq);
        extra[1] += double(o.out_sq);
        extra[2] += double(o.reg_sq);
        extra[3] += double(o.drift_sq);
        extra[4] += double(o.penalty);
      }
    }
    for (int c = 0; c < 2; ++c)
      for (int l = 0; l < Lanes; ++l) counts[c][l] += bs.count[c][l];
  }
  double total[5], masked = 0, nonfinite = 0;
  for (int s = 0; s < 5; ++s) {
    total[s] = extra[s];
    for (int l = 0; l < Lanes; ++l) total[s] += sums[s][l];
  }
  for (int l = 0; l < Lanes; ++l) {
    masked += double(counts[0][l]);
    nonfinite += double(counts[1][l]);
  }
  double* s = acc + g * 7;
  for (int j = 0; j < 5; ++j) s[j] += total[j];
  s[5] += masked; s[6] += nonfinite;
}

template <typename T, typename S>
using SegmentFn = void (*)(const StepArgs&, const StepScalars&, int64_t, int64_t, int64_t, double*);

template <typename T, typename S>
SegmentFn<T, S> segment_fn(bool ema, bool fisher, bool directional) {
  static constexpr SegmentFn<T, S> table[8] = {
      step_segment<T, S, false, false, false>, step_segment<T, S, false, false, true>,
      step_segment<T, S, false, true, false>,  step_segment<T, S, false, true, true>,
      step_segment<T, S, true, false, false>,  step_segment<T, S, true, false, true>,
      step_segment<T, S, true, true, false>,   step_segment<T, S, true, true, true>};
  return table[(ema ? 4 : 0) + (fisher ? 2 : 0) + (directional ? 1 : 0)];
}

template <typename T, typename S>
void fused_step_impl(const StepArgs& a) {
  const StepScalars k{float(a.beta), float(1.0 - a.beta), a.ema, a.fisher_kind, a.directional};
  const SegmentFn<T, S> segment = segment_fn<T, S>(a.ema, a.fisher_kind, a.directional);
  const int threads = cpu_threads();
  const int64_t G = a.groups;
  std::fill(a.scratch, a.scratch + int64_t(threads) * G * 7, 0.0);
  parallel_chunks(a.n, [&](int t, int64_t lo, int64_t hi) {
    double* acc = a.scratch + int64_t(t) * G * 7;
    for_segments(a.offsets, G, lo, hi, [&](int64_t s, int64_t e, int64_t g) {
      segment(a, k, s, e, g, acc);
    });
  });
  for (int64_t j = 0; j < G * 7; ++j) {
    double total = 0;
    for (int t = 0; t < threads; ++t) total += a.scratch[int64_t(t) * G * 7 + j];
    a.stats[j] = float(total);
  }
}

// ------------------------------------------------------------------ radix select

// One thread's histogram of [lo, hi) for one pass, added into `h` (int64, kBins), and
// for pass 0 with `sum` (the group's sum for c_g, DESIGN.md 2: one pass fewer than a
// separate sum) the sum of the values in double.
//
// Pass 0 counts every element: four uint32 sub-histograms, one per element of an
// unrolled four, so that equal digits in a row (the values of a group cluster in few
// bins) do not wait on each other's read-modify-write through memory. Passes 1 and 2
// count only the elements that share the digits fixed so far, usually a few percent:
// the prefix test runs on whole vectors of fp32 bits and only the matches are counted.
constexpr int kSub = 4;
constexpr int64_t kSlice = int64_t(1) << 30;    // elements per flush: uint32 counts stay exact
constexpr int64_t kSmallRange = int64_t(1) << 14;

template <typename T>
void histogram_range(const T* __restrict x, int64_t lo, int64_t hi, int pass, uint32_t prefix,
                     int64_t* __restrict h, double* sum) {
  if (hi - lo < kSmallRange) {      // a small group: no sub-histograms to clear and flush
    double total = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const float v = load(x[i]);
      const uint32_t bits = abs_bits(v);
      if (select::in_prefix(bits, prefix, pass)) ++h[select::digit_of(bits, pass)];
      total += double(v);
    }
    if (sum) *sum += total;
    return;
  }
  alignas(64) uint32_t sub[kSub][select::kBins];
  double s[1] = {0};
  for (int64_t base = lo; base < hi; base += kSlice) {
    const int64_t end = std::min(hi, base + kSlice);
    std::memset(sub, 0, sizeof(sub));
    int64_t i = base;
    if (pass == 0) {
      // the sum in a vectorised loop of its own over each L1-sized block just counted
      constexpr int64_t kL1 = 2048;
      for (; i < end; i += kL1) {
        const int64_t e = std::min(end, i + kL1);
        int64_t j = i;
        for (; j + kSub <= e; j += kSub)
          for (int u = 0; u < kSub; ++u) ++sub[u][select::digit_of(abs_bits(load(x[j + u])), 0)];
        for (; j < e; ++j) ++sub[0][select::digit_of(abs_bits(load(x[j])), 0)];
        if (sum) {
          double block = 0;
#pragma omp simd reduction(+ : block)
          for (j = i; j < e; ++j) block += double(load(x[j]));
          s[0] += block;
        }
      }
    } else {
      const int shift = select::shift_of(pass) + 10;
      const uint32_t want = prefix >> shift;
      const auto count = [&](int64_t j) {
        const uint32_t bits = abs_bits(load(x[j]));
        if ((bits >> shift) == want) ++sub[0][select::digit_of(bits, pass)];
      };
#if defined(__SSE2__)
      if constexpr (std::is_same_v<T, float>) {
#if defined(__AVX512F__)
        // The matches' bits are compressed into a buffer (no branch per vector, whose
        // outcome is a coin toss when a few percent of the elements match), then counted.
        constexpr int W = 16, kBuf = 1024;
        alignas(64) uint32_t buf[kBuf + W];
        int used = 0;
        const auto flush = [&] {
          int j = 0;
          for (; j + kSub <= used; j += kSub)
            for (int u = 0; u < kSub; ++u) ++sub[u][select::digit_of(buf[j + u], pass)];
          for (; j < used; ++j) ++sub[0][select::digit_of(buf[j], pass)];
          used = 0;
        };
        const __m512i mag = _mm512_set1_epi32(0x7FFFFFFF), w = _mm512_set1_epi32(int(want));
        const __m128i sh = _mm_cvtsi32_si128(shift);
        for (; i + W <= end; i += W) {
          const __m512i v = _mm512_and_si512(_mm512_loadu_si512(x + i), mag);
          const __mmask16 m = _mm512_cmpeq_epi32_mask(_mm512_srl_epi32(v, sh), w);
          _mm512_storeu_si512(buf + used, _mm512_maskz_compress_epi32(m, v));
          used += __builtin_popcount(uint32_t(m));
          if (used >= kBuf) flush();
        }
        flush();
#elif defined(__AVX2__)
        constexpr int W = 8;
        const __m256i mag = _mm256_set1_epi32(0x7FFFFFFF), w = _mm256_set1_epi32(int(want));
        const __m128i sh = _mm_cvtsi32_si128(shift);
        for (; i + W <= end; i += W) {
          const __m256i v = _mm256_and_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), mag);
          uint32_t m = uint32_t(_mm256_movemask_ps(
              _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_srl_epi32(v, sh), w))));
          for (; m; m &= m - 1) count(i + __builtin_ctz(m));
        }
#else
        constexpr int W = 4;
        const __m128i mag = _mm_set1_epi32(0x7FFFFFFF), w = _mm_set1_epi32(int(want));
        const __m128i sh = _mm_cvtsi32_si128(shift);
        for (; i + W <= end; i += W) {
          const __m128i v = _mm_and_si128(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)), mag);
          uint32_t m = uint32_t(_mm_movemask_ps(
              _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_srl_epi32(v, sh), w))));
          for (; m; m &= m - 1) count(i + __builtin_ctz(m));
        }
#endif
      }
#endif
      for (; i < end; ++i) count(i);
    }
    for (int u = 0; u < kSub; ++u)
      for (int b = 0; b < select::kBins; ++b) h[b] += sub[u][b];
  }
  if (sum) *sum += s[0];
}

// Pass 1 over [lo, hi) with the elements it counts kept: the |x| bits sharing pass 0's
// digit are appended to `out` and counted into `h`. Pass 2 then counts from `out` alone
// instead of reading the whole buffer a third time. Returns false (out cleared, nothing
// counted) when more than `cap` match: the caller then falls back to full passes.
template <typename T>
bool collect_pass1(const T* __restrict x, int64_t lo, int64_t hi, uint32_t prefix,
                   std::vector<uint32_t>& out, size_t cap, int64_t* __restrict h) {
  const int shift = select::shift_of(1) + 10;
  const uint32_t want = prefix >> shift;
  const size_t start = out.size();
  int64_t i = lo;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    constexpr int W = 16;
    const __m512i mag = _mm512_set1_epi32(0x7FFFFFFF), w = _mm512_set1_epi32(int(want));
    const __m128i sh = _mm_cvtsi32_si128(shift);
    constexpr int64_t kChunk = 4096;   // grow `out` per chunk, not per vector
    alignas(64) uint32_t buf[kChunk + W];
    for (; i + W <= hi && out.size() - start <= cap;) {
      const int64_t e = std::min(hi, i + kChunk);
      size_t used = 0;
      for (; i + W <= e; i += W) {
        const __m512i v = _mm512_and_si512(_mm512_loadu_si512(x + i), mag);
        const __mmask16 m = _mm512_cmpeq_epi32_mask(_mm512_srl_epi32(v, sh), w);
        _mm512_storeu_si512(buf + used, _mm512_maskz_compress_epi32(m, v));
        used += size_t(__builtin_popcount(uint32_t(m)));
      }
      out.insert(out.end(), buf, buf + used);
    }
  }
#endif
  for (; i < hi && out.size() - start <= cap; ++i) {
    const uint32_t bits = abs_bits(load(x[i]));
    if ((bits >> shift) == want) out.push_back(bits);
  }
  if (out.size() - start > cap) {
    out.resize(start);
    return false;
  }
  alignas(64) uint32_t sub[kSub][select::kBins];
  std::memset(sub, 0, sizeof(sub));
  const uint32_t* b = out.data();
  const size_t n = out.size();
  size_t j = start;
  for (; j + kSub <= n; j += kSub)
    for (int u = 0; u < kSub; ++u) ++sub[u][select::digit_of(b[j + u], 1)];
  for (; j < n; ++j) ++sub[0][select::digit_of(b[j], 1)];
  for (int u = 0; u < kSub; ++u)
    for (int b2 = 0; b2 < select::kBins; ++b2) h[b2] += sub[u][b2];
  return true;
}

// The groups of at least window::kMinGroup elements (with k > 0, or a sum to take) in
// one streaming pass (select_window_cpu.h): a settled group gets st[g] = {its k-th
// largest, 0}; one whose window missed keeps its state for the radix passes. Their sums
// are added into `sums` (per thread and group, as pass 0 would) and marked in `summed`.
// One parallel region, no barrier inside: each thread takes the samples of the groups
// in its contiguous range (a group split between threads is sampled by each, the same
// places, the same window), then streams its range, counting the histogram of the bits
// it keeps; the selects among the kept (a walk of the summed histograms and one bin's
// bits) follow on the calling thread. Samples taken on the calling thread before the
// region are a serial part of a two-thread call; taken in the region with a barrier
// before the stream, a busy machine made that wait long (the benchmark's three groups,
// two threads, interleaved, best of 25, load 4.2-4.4: 10.9 / 8.5 / 11.6 ms wall, on the
// calling thread 8.6 / 8.7 / 8.7 ms).
template <typename T>
void window_stage(const T* x, const ThresholdArgs& a, select::State* st, double* sums,
                  std::vector<char>& summed) {
  const int threads = cpu_threads();
  const int64_t G = a.groups, rows = int64_t(threads) * G;
  const bool want_sum = a.inv_scale && a.normalize;
  std::vector<char> on(static_cast<size_t>(G), 0);
  std::vector<int64_t> slot(static_cast<size_t>(G), -1);   // groups with k > 0: a histogram
  int64_t S = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = a.offsets[g + 1] - a.offsets[g], k = st[g].remaining;
    if (n < window::kMinGroup || (k <= 0 && !want_sum)) continue;
    on[size_t(g)] = 1;
    if (k > 0) slot[size_t(g)] = S++;
  }
  if (std::find(on.begin(), on.end(), 1) == on.end()) return;
  // Per (thread, group) row: the kept bits; per (thread, group with k > 0): their
  // histogram. Held by the calling thread between calls, as cand_cache below (used
  // through a reference inside the region).
  thread_local std::vector<std::vector<uint32_t>> buf_cache;
  thread_local std::vector<uint32_t> hist_cache;
  std::vector<std::vector<uint32_t>>& buf = buf_cache;
  std::vector<uint32_t>& hist = hist_cache;
  if (buf.size() < size_t(rows)) buf.resize(size_t(rows));
  try {
    hist.resize(size_t(threads) * size_t(S) * window::kKthBins);
  } catch (const std::bad_alloc&) {
    return;   // no window: the radix passes select every group
  }
  std::vector<window::Part> parts(static_cast<size_t>(rows));
  std::vector<window::Bounds> w(static_cast<size_t>(rows));   // per row: the group's window
  std::vector<char> failed(static_cast<size_t>(rows), 0);     // its sample found no memory
#pragma omp parallel num_threads(threads) if (a.n >= kSerialBelow)
  {
    const int t = omp_get_thread_num(), team = omp_get_num_threads();
    // each worker's own (a thread_local named inside the region)
    thread_local std::vector<uint32_t> sample;
    const int64_t lo = a.n * t / team, hi = a.n * (t + 1) / team;
    alignas(64) uint32_t spare[window::kStretch + 16];
    if (lo < hi)
      for_segments(a.offsets, G, lo, hi, [&](int64_t s, int64_t e, int64_t g) {
        if (!on[size_t(g)]) return;
        const int64_t row = t * G + g;
        window::Bounds& wg = w[size_t(row)];
        const int64_t sl = slot[size_t(g)];
        if (sl >= 0) {
          try {   // no exception may leave the region
            wg = window::bounds_of(x + a.offsets[g], a.offsets[g + 1] - a.offsets[g],
                                   st[g].remaining, sample);
          } catch (const std::bad_alloc&) {
            failed[size_t(row)] = 1;   // the radix passes select it (and take its sum)
            return;
          }
        } else {   // k = 0 with a sum to take: an empty window (nothing is > lo and <= hi)
          wg = window::Bounds{0xFFFFFFFFu, 0xFFFFFFFFu, 0.0};
        }
        // twice the share the sample expects: a window holding more was misplaced
        size_t cap = size_t(2.0 * wg.expected_fraction * double(e - s)) + 4096;
        uint32_t* out = spare;
        try {   // no exception may leave the region
          std::vector<uint32_t>& b = buf[size_t(row)];
          if (b.size() < cap + window::kStretch + 16) b.resize(cap + window::kStretch + 16);
          out = b.data();
        } catch (const std::bad_alloc&) {
          cap = 0;   // counts and sum only; the group falls back to the radix passes
        }
        uint32_t* h = sl >= 0 ? hist.data() + (size_t(t) * size_t(S) + size_t(sl)) * window::kKthBins
                              : nullptr;
        window::stream(x, s, e, wg, want_sum, out, cap, parts[size_t(row)], h,
                       window::bins_of(wg));
      });
  }
  std::vector<std::pair<const uint32_t*, size_t>> held;
  std::vector<uint32_t> total(window::kKthBins), bin;
  for (int64_t g = 0; g < G; ++g) {
    if (!on[size_t(g)]) continue;
    bool lost = false;   // a part not streamed: the radix passes take the group, sum too
    for (int t = 0; t < threads; ++t) lost = lost || failed[size_t(t * G + g)];
    if (lost) continue;
    int64_t above = 0, at_lo = 0, kept = 0;
    bool overflow = false;
    const window::Bounds* wg = nullptr;   // the group's window (every part's is the same)
    held.clear();
    std::fill(total.begin(), total.end(), 0u);
    for (int t = 0; t < threads; ++t) {
      const window::Part& p = parts[size_t(t * G + g)];
      if (!p.streamed) continue;
      wg = &w[size_t(t * G + g)];
      sums[t * G + g] += p.sum;
      above += p.above;
      at_lo += p.at_lo;
      kept += int64_t(p.kept);
      overflow = overflow || p.overflow;
      if (p.kept) held.emplace_back(buf[size_t(t * G + g)].data(), p.kept);
      if (p.histogram && p.kept) {
        const uint32_t* h =
            hist.data() + (size_t(t) * size_t(S) + size_t(slot[size_t(g)])) * window::kKthBins;
        for (int d = 0; d < window::kKthBins; ++d) total[size_t(d)] += h[d];
      }
    }
    summed[size_t(g)] = want_sum;
    const int64_t k = st[g].remaining;
    if (k <= 0 || overflow || !wg) continue;
    if (above < k && k <= above + kept)              // among the kept
      st[g] = select::State{window::kth_of(total.data(), held, k - above,
                                           window::bins_of(*wg), wg->hi, bin),
                            0};
    else if (above + kept < k && k <= above + kept + at_lo)   // equal to lo (at_lo 0 when lean)
      st[g] = select::State{wg->lo, 0};
    // else: the window missed; the radix passes select this group
  }
  // Kept for the next call: rows of at most 16 MiB, 64 MiB in all (many large groups
  // would otherwise leave a tenth of their size held by this thread).
  constexpr size_t kRetain = size_t(1) << 22;   // elements (16 MiB) per row
  size_t held_total = 0;
  for (auto& b : buf) {
    if (b.capacity() > kRetain) std::vector<uint32_t>().swap(b);
    held_total += b.capacity();
  }
  if (held_total > 4 * kRetain) std::vector<std::vector<uint32_t>>().swap(buf);
  if (hist.capacity() > kRetain) std::vector<uint32_t>().swap(hist);
}

// The k-th largest |x| of every group at once (DESIGN.md 2). Groups of at least
// window::kMinGroup elements first try one pass (window_stage); the others, and those
// whose window missed, take three radix passes, the
// first two over the whole buffer and the third over what the second kept (see
// collect_pass1; the whole buffer again where that was over its cap), one parallel
// region each (a region per group and pass cost a wake-up of the team, and on a busy machine a wait for a descheduled thread, each time). Each thread
// takes one contiguous range and keeps one histogram per group it meets; between passes
// the histograms are summed over the threads and each group's select walks its own.
// The group sums for c_g are taken in the first pass. Scratch (cpu_threshold_scratch_bytes):
// threads x G x kBins int64 counts, threads x G double sums, G select states.
template <typename T>
void thresholds_impl(const ThresholdArgs& a) {
  const T* x = static_cast<const T*>(a.importance);
  const int threads = cpu_threads();
  const int64_t G = a.groups, rows = int64_t(threads) * G;
  int64_t* hist = static_cast<int64_t*>(a.scratch);
  double* sums = reinterpret_cast<double*>(hist + rows * select::kBins);
  select::State* st = reinterpret_cast<select::State*>(sums + rows);
  const bool want_sum = a.inv_scale && a.normalize;
  bool any = false;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = a.offsets[g + 1] - a.offsets[g];
    const int64_t k = n ? select::kth_count(a.ratios ? a.ratios[g] : a.ratio, n) : 0;
    if (k > n) throw std::invalid_argument("k-th largest: k exceeds the group's size");
    st[g] = select::State{0u, k};
    any = any || k > 0;
  }
  std::fill(sums, sums + rows, 0.0);
  // Large groups first: one pass with a sampled window (select_window_cpu.h); the
  // groups it settles leave the radix passes (remaining 0), and it takes their sums.
  std::vector<char> summed(static_cast<size_t>(G), 0);
  window_stage(x, a, st, sums, summed);
  any = false;
  bool sum_left = false;
  for (int64_t g = 0; g < G; ++g) {
    any = any || st[g].remaining > 0;
    sum_left = sum_left || (want_sum && !summed[size_t(g)]);
  }
  // Pass 1's matches per (thread, group) row, for pass 2; kept[row] false: not collected.
  // Held by the calling thread between calls (fresh memory costs a page fault per 4 KiB
  // on first touch, as much as the pass it saves; capacities over kRetain are released
  // at the end). Used through a reference: inside the parallel region the name of a
  // thread_local would be each worker's own.
  thread_local std::vector<std::vector<uint32_t>> cand_cache;
  std::vector<std::vector<uint32_t>>& cand = cand_cache;
  if (cand.size() < size_t(rows)) cand.resize(size_t(rows));
  for (auto& c : cand) c.clear();
  std::vector<char> kept(static_cast<size_t>(rows), 0);
  for (int pass = 0; pass < select::kPasses && (any || (pass == 0 && sum_left)); ++pass) {
    std::fill(hist, hist + rows * select::kBins, int64_t(0));
    const bool with_sum = pass == 0 && sum_left;
#pragma omp parallel num_threads(threads) if (a.n >= kSerialBelow)
    {
      const int t = omp_get_thread_num(), team = omp_get_num_threads();
      const int64_t lo = a.n * t / team, hi = a.n * (t + 1) / team;
      if (lo < hi)
        for_segments(a.offsets, G, lo, hi, [&](int64_t s, int64_t e, int64_t g) {
          const bool sum_here = with_sum && !summed[size_t(g)];
          if (st[g].remaining <= 0 && !sum_here) return;   // k = 0 or settled: nothing to select
          const int64_t row = t * G + g;
          int64_t* hr = hist + row * select::kBins;
          if (pass == 1) {
            // a capped buffer: a group whose matches are more than an eighth of it is
            // cheaper read again than copied
            try {
              kept[row] = collect_pass1(x, s, e, st[g].prefix, cand[row],
                                        size_t((e - s) / 8), hr);
            } catch (const std::bad_alloc&) {   // no exception may leave the region
              cand[row].clear();
              kept[row] = 0;
            }
            if (kept[row]) return;
          } else if (pass == 2 && kept[row]) {
            const uint32_t* b = cand[row].data();
            const size_t m = cand[row].size();
            for (size_t j = 0; j < m; ++j)
              if (select::in_prefix(b[j], st[g].prefix, 2)) ++hr[select::digit_of(b[j], 2)];
            return;
          }
          histogram_range(x, s, e, pass, st[g].prefix, hist + (t * G + g) * select::kBins,
                          sum_here ? sums + t * G + g : nullptr);
        });
    }
    for (int64_t g = 0; g < G; ++g) {
      if (st[g].remaining <= 0) continue;
      int64_t* h = hist + g * select::kBins;
      for (int t = 1; t < threads; ++t)
        for (int b = 0; b < select::kBins; ++b) h[b] += hist[(t * G + g) * select::kBins + b];
      select::walk(st[g], pass, [&](int d) { return h[d]; });
    }
  }
  constexpr size_t kRetain = size_t(1) << 22;   // elements (16 MiB) per row
  for (auto& c : cand)
    if (c.capacity() > kRetain) std::vector<uint32_t>().swap(c);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = a.offsets[g + 1] - a.offsets[g];
    const bool k_is_zero = n == 0 || select::kth_count(a.ratios ? a.ratios[g] : a.ratio, n) <= 0;
    a.thresh[g] = select::result(st[g].prefix, k_is_zero);
    if (a.inv_scale) {
      double total = 0;
      for (int t = 0; t < threads; ++t) total += sums[t * G + g];
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

// DESIGN.md 2.3 given m_g (a.thresh, [G]): the resets of every group.
template <typename T>
void align_apply_impl(const AlignArgs& a) {
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

template <typename T>
void align_impl(const AlignArgs& a) {
  ThresholdArgs t{a.anchor, a.dtype, a.offsets, a.n, a.groups, nullptr, a.ratio, false,
                  nullptr, a.thresh, a.scratch};
  thresholds_impl<T>(t);
  align_apply_impl<T>(a);
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
template <typename T> struct AlignApplyFn {
  static void run(const AlignArgs& a) { align_apply_impl<T>(a); }
};

}  // namespace

void fused_step(const StepArgs& a) { by_dtype<StepFn>(a.dtype, a); }
void group_thresholds(const ThresholdArgs& a) { by_dtype<ThresholdsFn>(a.state_dtype, a); }
void consolidate(const ConsolidateArgs& a) { by_dtype<ConsolidateFn>(a.dtype, a); }
void align(const AlignArgs& a) { by_dtype<AlignFn>(a.dtype, a); }
void align_apply(const AlignArgs& a) { by_dtype<AlignApplyFn>(a.dtype, a); }

}  // namespace AIM_CPU_NS
}  // namespace aim
