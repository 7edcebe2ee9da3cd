// The k-th largest |x| of a large group in one pass over it (Floyd-Rivest style), for
// the CPU's group_thresholds (ops_cpu.cpp): the three radix passes of select.h read the
// whole group three times, bound by the histogram increment (~1 element per cycle).
//
//  1. A sample of the group (one element per stratum of n/s, at a hashed place in it)
//     gives a window [L, U] of |x| bits that holds the k-th largest with high
//     probability (the sample ranks k s / n -+ 4 sigma + 8).
//  2. One streaming pass that only compares (whole vectors, memory-bound): counts the
//     elements above U and those equal to L, and keeps the bits of those in (L, U]
//     (~2-3% of the group) in a buffer; the group sum for c_g is taken in the same pass.
//  3. If the counts show the k-th largest inside the window, it is selected exactly
//     among the kept bits (the radix select again, on ~2% of the data); otherwise
//     (a window the sample misplaced, or one holding more than its cap) the caller
//     falls back to the radix passes over the whole group.
//
// Everything is compared as the fp32 bits of |x| (as select.h ranks them, NaN above
// +inf, -0 as 0), so the result is exactly the radix select's, ties included.
// CPU-only: included by ops_cpu.cpp once per instruction-set build.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "aim_math.h"
#include "select.h"

namespace aim {
inline namespace AIM_CPU_NS {
namespace window {

constexpr int64_t kMinGroup = int64_t(1) << 16;   // smaller groups: the radix passes
constexpr int64_t kMaxSample = int64_t(1) << 13;

struct Bounds {
  uint32_t lo, hi;            // the window: candidates have lo < bits <= hi
  double expected_fraction;   // of the group's elements inside it
};

// Sample size for a group of n elements (n >= kMinGroup): 1/16 of it, at most kMaxSample.
inline int64_t sample_size(int64_t n) { return std::min(kMaxSample, n / 16); }

// Place of sample j in its stratum [j w, (j + 1) w), w = floor(n / s): a multiplicative
// hash of j scaled to w (no division per sample), so that a period in the data (rows of
// a weight matrix) does not line up with the stride. tests/test_select_window.py
// computes these places to build a sample that misleads.
inline int64_t sample_place(int64_t j, int64_t w) {
  const uint64_t h = (uint64_t(j) * 2654435761ull) & 0xFFFFFFFFull;
  return j * w + int64_t((h * uint64_t(w)) >> 32);
}

// The window of the k-th largest of x[0, n) from its sample. `sample`: scratch.
template <typename T>
Bounds bounds_of(const T* x, int64_t n, int64_t k, std::vector<uint32_t>& sample) {
  const int64_t s = sample_size(n);
  sample.resize(size_t(s));
  const int64_t w = n / s;
  for (int64_t j = 0; j < s; ++j) sample[size_t(j)] = abs_bits(load(x[sample_place(j, w)]));
  const double p = double(k) / double(n), r = p * double(s);
  const double delta = 4.0 * std::sqrt(double(s) * p * (1.0 - p)) + 8.0;
  // descending ranks (1-based) of the window's ends in the sample
  const int64_t r_hi = int64_t(std::floor(r - delta)), r_lo = int64_t(std::ceil(r + delta));
  Bounds b{0u, 0xFFFFFFFFu, 0.0};
  // the r-th largest of s is at index s - r ascending; the second select only looks
  // above the first (r_hi < r_lo)
  auto from = sample.begin();
  if (r_lo <= s) {
    auto it = sample.begin() + (s - r_lo);
    std::nth_element(sample.begin(), it, sample.end());
    b.lo = *it;
    from = it + 1;
  }
  if (r_hi >= 1) {
    auto it = sample.begin() + (s - r_hi);
    std::nth_element(from, it, sample.end());
    b.hi = *it;
  }
  b.expected_fraction = double(std::min(r_lo, s + 1) - std::max<int64_t>(r_hi, 0)) / double(s);
  return b;
}

// One thread's share [lo, hi) of a group in the streaming pass.
struct Part {
  int64_t above = 0;          // bits > hi
  int64_t at_lo = 0;          // bits == lo
  size_t kept = 0;            // bits in (lo, hi], stored in the part's buffer
  bool overflow = false;      // more than the cap were in the window: not usable
  double sum = 0;             // of the values (for c_g), when asked
};

constexpr int64_t kStretch = 2048;      // elements between two checks of the cap

// Streams x[lo, hi): counts into `part`, keeps the window's bits in `buf` (room for cap
// + kStretch + 16 entries), adds the values into part.sum when `with_sum`.
template <typename T>
void stream(const T* __restrict x, int64_t lo, int64_t hi, const Bounds& w, bool with_sum,
            uint32_t* __restrict buf, size_t cap, Part& part) {
  const uint32_t wl = w.lo, wh = w.hi;
  int64_t above = 0, at_lo = 0;
  size_t used = 0;
  bool overflow = false;
  double sum = 0;
  for (int64_t base = lo; base < hi; base += kStretch) {
    const int64_t end = std::min(hi, base + kStretch);
    int64_t i = base;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      constexpr int W = 16;
      const __m512i mag = _mm512_set1_epi32(0x7FFFFFFF), vl = _mm512_set1_epi32(int(wl)),
                    vh = _mm512_set1_epi32(int(wh)), one = _mm512_set1_epi32(1);
      __m512i n_above = _mm512_setzero_si512(), n_lo = _mm512_setzero_si512();
      __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
      for (; i + W <= end; i += W) {
        const __m512 raw = _mm512_loadu_ps(x + i);
        const __m512i v = _mm512_and_si512(_mm512_castps_si512(raw), mag);
        const __mmask16 gt_hi = _mm512_cmpgt_epu32_mask(v, vh);
        const __mmask16 gt_lo = _mm512_cmpgt_epu32_mask(v, vl);
        const __mmask16 eq_lo = _mm512_cmpeq_epu32_mask(v, vl);
        const __mmask16 in = _kandn_mask16(gt_hi, gt_lo);
        _mm512_storeu_si512(buf + used, _mm512_maskz_compress_epi32(in, v));
        used += size_t(__builtin_popcount(uint32_t(in)));
        n_above = _mm512_mask_add_epi32(n_above, gt_hi, n_above, one);
        n_lo = _mm512_mask_add_epi32(n_lo, eq_lo, n_lo, one);
        if (with_sum) {
          s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(raw)));
          s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(
                                     _mm512_extractf64x4_pd(_mm512_castps_pd(raw), 1))));
        }
      }
      above += _mm512_reduce_add_epi32(n_above);   // <= kStretch per lane: no overflow
      at_lo += _mm512_reduce_add_epi32(n_lo);
      if (with_sum) sum += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    }
#endif
    for (; i < end; ++i) {
      const float v = load(x[i]);
      const uint32_t b = abs_bits(v);
      buf[used] = b;                       // kept only if counted: no branch
      used += size_t(b > wl && b <= wh);
      above += int64_t(b > wh);
      at_lo += int64_t(b == wl);
      if (with_sum) sum += double(v);
    }
    if (used > cap) {     // a misplaced window: keep streaming for the counts and sum
      overflow = true;
      used = 0;
    }
  }
  part.above += above;
  part.at_lo += at_lo;
  part.kept = overflow ? 0 : used;
  part.overflow = part.overflow || overflow;
  part.sum += sum;
}

// The k-th largest (1-based) of the bits held in `parts` (pointer, count), all in
// (lo, hi]: the radix select of select.h over these few. A pass whose digit all of
// (lo, hi] share is not made (a narrow window shares the top bits); the others count
// into four sub-histograms, one per element of an unrolled four, so that equal digits
// in a row (all of them here share the bits above) do not wait on each other.
inline uint32_t kth_of(const std::vector<std::pair<const uint32_t*, size_t>>& parts,
                       int64_t k, uint32_t lo, uint32_t hi, std::vector<uint32_t>& hist) {
  constexpr int kSub = 4;
  select::State st{0u, k};
  hist.resize(size_t(kSub) * select::kBins);
  for (int pass = 0; pass < select::kPasses; ++pass) {
    const int sh = select::shift_of(pass);
    // every bit pattern in (lo, hi] has this digit (and those above): rank unchanged
    if (((lo + 1) >> sh) == (hi >> sh)) {
      st.prefix |= uint32_t(select::digit_of(hi, pass)) << sh;
      continue;
    }
    std::fill(hist.begin(), hist.end(), 0u);
    uint32_t* h = hist.data();
    for (const auto& p : parts) {
      const uint32_t* b = p.first;
      const size_t n = p.second;
      size_t j = 0;
      if (pass == 0) {
        for (; j + kSub <= n; j += kSub)
          for (int u = 0; u < kSub; ++u) ++h[u * select::kBins + select::digit_of(b[j + u], 0)];
      } else {
        for (; j + kSub <= n; j += kSub)
          for (int u = 0; u < kSub; ++u) {
            const uint32_t x = b[j + u];
            // outside the prefix: into a bin of its own sub-histogram that is not read
            const int d = select::in_prefix(x, st.prefix, pass) ? select::digit_of(x, pass)
                                                                : select::kBins - 1;
            ++h[u * select::kBins + d];
          }
      }
      for (; j < n; ++j)
        if (select::in_prefix(b[j], st.prefix, pass)) ++h[select::digit_of(b[j], pass)];
    }
    select::walk(st, pass, [&](int d) {
      int64_t c = 0;
      for (int u = 0; u < kSub; ++u) c += h[u * select::kBins + d];
      return c;
    });
  }
  return st.prefix;
}

}  // namespace window
}  // namespace AIM_CPU_NS
}  // namespace aim
