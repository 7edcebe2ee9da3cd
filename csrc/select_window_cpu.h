// The k-th largest |x| of a large group in one pass over it (Floyd-Rivest style), for
// the CPU's group_thresholds (ops_cpu.cpp): the three radix passes of select.h read the
// whole group three times, bound by the histogram increment (~1 element per cycle).
//
//  1. A sample of the group (one element per stratum of n/s, at a hashed place in it)
//     gives a window [L, U] of |x| bits that holds the k-th largest with high
//     probability (the sample ranks k s / n -+ 4 sigma + 8).
//  2. One streaming pass that only compares (whole vectors, memory-bound): counts the
//     elements above U and those equal to L, and keeps the bits of those in (L, U]
//     (~4-6% of the group) in a buffer; the group sum for c_g is taken in the same pass.
//  3. If the counts show the k-th largest inside the window, it is selected exactly
//     among the kept bits (kth_of: a histogram over the window, counted in the pass,
//     then the one bin that holds the rank); otherwise
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
// At most 4096 places: from DRAM each costs a miss of its own (the benchmark's three
// groups, one thread: 8192 places each 0.68-0.90 ms, 4096 0.43-0.57 ms, runs at load
// 2-4 with a 128 MiB copy before each), while the window,
// and the share of the group kept, widen only by sqrt(2) (there 2.7-4.1% -> 4.1-5.8%).
// One thread, _C alone, interleaved with the benchmark's copies (load 2.4): 7.95 / 7.83
// / 8.28 / 7.78 ms with 8192, 7.78 / 7.78 / 8.19 / 7.62 ms with 4096.
constexpr int64_t kMaxSample = int64_t(1) << 12;

struct Bounds {
  uint32_t lo, hi;            // the window: candidates have lo < bits <= hi
  double expected_fraction;   // of the group's elements inside it
  // lo is rare in the sample (at most kLeanTies of it): the pass keeps [lo, hi] and
  // counts no ties at lo, two vector operations fewer per 16 elements (one thread, 2^24
  // fp32 from DRAM, the window pass with its histogram: 6.9-7.1 -> 6.75-6.8 ms; load 4.7).
  // A lo shared by many (Ω mostly 0, a few distinct values) would fill the buffer: there
  // the window is (lo, hi] and the ties at lo are counted.
  bool lean = false;
};
constexpr int64_t kLeanTies = 8;

// Sample size for a group of n elements (n >= kMinGroup): 1/16 of it, at most kMaxSample.
inline int64_t sample_size(int64_t n) { return std::min(kMaxSample, n / 16); }
constexpr int64_t kSampleAhead = 64;

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
  // Every sample is a cache (and mostly a TLB) miss of its own: prefetched kSampleAhead
  // places ahead, so that many are in flight. The benchmark's 3 groups, one thread, just
  // after a pass over them: 0.37 -> 0.27 ms; from DRAM (a 128 MiB copy before) 0.82-0.87
  // ms with or without, bound by the misses themselves (load 2-3).
  for (int64_t j = 0; j < std::min(kSampleAhead, s); ++j)
    __builtin_prefetch(x + sample_place(j, w), 0);
  for (int64_t j = 0; j < s; ++j) {
    if (j + kSampleAhead < s) __builtin_prefetch(x + sample_place(j + kSampleAhead, w), 0);
    sample[size_t(j)] = abs_bits(load(x[sample_place(j, w)]));
  }
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
  b.lean = std::count(sample.begin(), sample.end(), b.lo) <= kLeanTies;
  return b;
}

// One thread's share [lo, hi) of a group in the streaming pass.
struct Part {
  int64_t above = 0;          // bits > hi
  int64_t at_lo = 0;          // bits == lo (not counted when lean)
  size_t kept = 0;            // bits in (lo, hi] ([lo, hi] when lean), in the part's buffer
  bool overflow = false;      // more than the cap were in the window: not usable
  double sum = 0;             // of the values (for c_g), when asked
  bool histogram = false;     // the part's histogram of the kept bits was counted
  bool streamed = false;      // stream ran over this part
};

// The bins of the kept bits' histogram (kth_of): kKthBins bins over the kept patterns
// [first, hi] (first = lo + 1, or lo when lean), bin = (bits - first) >> shift, the
// smallest shift that fits.
constexpr int kKthBins = 2048;
struct Bins {
  uint32_t first;             // the smallest bit pattern kept
  int shift;
};
inline Bins bins_of(const Bounds& w) {
  const uint32_t first = w.lean ? w.lo : w.lo + 1;
  const uint64_t span = uint64_t(w.hi) - uint64_t(first) + 1;   // patterns kept, >= 1
  int shift = 0;
  while (((span - 1) >> shift) >= uint64_t(kKthBins)) ++shift;
  return Bins{first, shift};
}

constexpr int64_t kStretch = 2048;      // elements between two checks of the cap
// Software prefetch of the streaming pass, into L2 (prefetcht1), 4 KiB ahead, every
// 64-byte line. The hardware prefetcher alone kept one core's pass far below what it can
// pull (it does not run ahead across the 4 KiB pages): the AVX-512 fp32 pass over 2^24
// elements from DRAM (caches flushed by a 128 MiB copy between calls) took 10.5 ms of one
// thread's CPU time without, 7.0-7.2 with prefetcht0 2 KiB ahead, 6.6 with prefetcht1 4
// or 8 KiB ahead (prefetcht0 holds a line fill buffer of the core's few until the line
// arrives), where a plain read of the same 64 MB (an OR of all vectors) took 5.6-5.8 ms
// (load 4 on 2 cores).
constexpr int64_t kStreamAheadBytes = 4096;

template <typename T>
AIM_HD void prefetch_at(const T* x, int64_t i) {
  // an address past the end is never dereferenced: a prefetch does not fault
  __builtin_prefetch(reinterpret_cast<const char*>(x) + i * int64_t(sizeof(T)) + kStreamAheadBytes, 0, 2);
}

// Streams x[lo, hi): counts into `part`, keeps the window's bits in `buf` (room for cap
// + kStretch + 16 entries), adds the values into part.sum when `with_sum`. With `hist`
// (kKthBins counts, zeroed here) it also counts the kept bits into their bins, a stretch
// at a time while they are in L1: scalar work that overlaps the vector loop's wait on
// memory (one thread, 2^24 fp32 from DRAM: the pass alone 6.7 ms, with the histogram
// counted inside 6.9-7.1 ms, with it as a pass of its own after 7.3-7.4 ms; load 4.7
// on 2 cores).
template <bool Lean, typename T>
void stream_as(const T* __restrict x, int64_t lo, int64_t hi, const Bounds& w, bool with_sum,
               uint32_t* __restrict buf, size_t cap, Part& part, uint32_t* __restrict hist,
               Bins bins) {
  const uint32_t wl = w.lo, wh = w.hi, width = wh - wl;
  int64_t above = 0, at_lo = 0;
  size_t used = 0;
  bool overflow = false;
  double sum = 0;
  if (hist) std::fill(hist, hist + kKthBins, 0u);
  // elements per 64-byte line: one prefetch each
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  for (int64_t base = lo; base < hi; base += kStretch) {
    const int64_t end = std::min(hi, base + kStretch);
    const size_t start = used;
    int64_t i = base;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      constexpr int W = 16;
      const __m512i mag = _mm512_set1_epi32(0x7FFFFFFF), vl = _mm512_set1_epi32(int(wl)),
                    vh = _mm512_set1_epi32(int(wh)), one = _mm512_set1_epi32(1),
                    vw = _mm512_set1_epi32(int(width));
      __m512i n_above = _mm512_setzero_si512(), n_lo = _mm512_setzero_si512();
      __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
      for (; i + W <= end; i += W) {
        prefetch_at(x, i);
        const __m512 raw = _mm512_loadu_ps(x + i);
        const __m512i v = _mm512_and_si512(_mm512_castps_si512(raw), mag);
        const __mmask16 gt_hi = _mm512_cmpgt_epu32_mask(v, vh);
        __mmask16 in;
        if constexpr (Lean) {   // lo <= v <= hi: v - lo <= hi - lo, unsigned
          in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(v, vl), vw);
        } else {
          const __mmask16 gt_lo = _mm512_cmpgt_epu32_mask(v, vl);
          const __mmask16 eq_lo = _mm512_cmpeq_epu32_mask(v, vl);
          in = _kandn_mask16(gt_hi, gt_lo);
          n_lo = _mm512_mask_add_epi32(n_lo, eq_lo, n_lo, one);
        }
        _mm512_storeu_si512(buf + used, _mm512_maskz_compress_epi32(in, v));
        used += size_t(__builtin_popcount(uint32_t(in)));
        n_above = _mm512_mask_add_epi32(n_above, gt_hi, n_above, one);
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
    for (; i < end; i += kLine) {
      prefetch_at(x, i);
      const int64_t stop = std::min(end, i + kLine);
      for (int64_t j = i; j < stop; ++j) {
        const float v = load(x[j]);
        const uint32_t b = abs_bits(v);
        buf[used] = b;                       // kept only if counted: no branch
        if constexpr (Lean) {
          used += size_t(b - wl <= width);
        } else {
          used += size_t(b > wl && b <= wh);
          at_lo += int64_t(b == wl);
        }
        above += int64_t(b > wh);
        if (with_sum) sum += double(v);
      }
    }
    if (used > cap) {     // a misplaced window: keep streaming for the counts and sum
      overflow = true;
      used = 0;
    }
    if (hist && !overflow)
      for (size_t j = start; j < used; ++j) ++hist[(buf[j] - bins.first) >> bins.shift];
  }
  part.above += above;
  part.at_lo += at_lo;
  part.kept = overflow ? 0 : used;
  part.overflow = part.overflow || overflow;
  part.sum += sum;
  part.histogram = hist != nullptr;
  part.streamed = true;
}

template <typename T>
void stream(const T* __restrict x, int64_t lo, int64_t hi, const Bounds& w, bool with_sum,
            uint32_t* __restrict buf, size_t cap, Part& part, uint32_t* __restrict hist,
            Bins bins) {
  if (w.lean)
    stream_as<true>(x, lo, hi, w, with_sum, buf, cap, part, hist, bins);
  else
    stream_as<false>(x, lo, hi, w, with_sum, buf, cap, part, hist, bins);
}

// The k-th largest (1-based) of the bits held in `parts` (pointer, count), all in
// [bins.first, hi], from `hist`, their counts per bin of `bins` (stream counts them): the walk
// from the top bin finds the bin of the rank; one pass copies that bin's bits (~1/kKthBins
// of the kept, all of them where ties fill it) and nth_element picks the rank among
// them. A shift of 0 (a window of at most kKthBins bit patterns) needs no copy. It
// replaced the radix select of select.h over the kept (two or three passes with a prefix
// test each): the benchmark's three groups (527k kept bits) took 1.67 ms, 0.29 ms with
// this histogram as a pass of its own, one thread.
inline uint32_t kth_of(const uint32_t* hist,
                       const std::vector<std::pair<const uint32_t*, size_t>>& parts,
                       int64_t k, Bins bins, uint32_t hi, std::vector<uint32_t>& bin) {
  int64_t above = 0;
  int d = kKthBins - 1;
  while (d > 0 && above + int64_t(hist[d]) < k) {
    above += int64_t(hist[d]);
    --d;
  }
  const int64_t rank = k - above;                     // 1-based, descending, in bin d
  const uint32_t b_lo = bins.first + (uint32_t(d) << bins.shift);
  if (bins.shift == 0) return b_lo;                   // one pattern per bin
  // the bin's last pattern; every kept bit is <= hi (b_lo + 2^shift - 1 may pass 2^32)
  const uint32_t b_hi =
      uint32_t(std::min<uint64_t>(uint64_t(b_lo) + (uint64_t(1) << bins.shift) - 1, hi));
  const size_t m = size_t(hist[d]);
  bin.resize(m + 16);
  size_t got = 0;
  for (const auto& p : parts) {
    const uint32_t* b = p.first;
    const size_t n = p.second;
    size_t j = 0;
#if defined(__AVX512F__)
    const __m512i vlo = _mm512_set1_epi32(int(b_lo)), vhi = _mm512_set1_epi32(int(b_hi));
    for (; j + 16 <= n; j += 16) {
      const __m512i v = _mm512_loadu_si512(b + j);
      const __mmask16 in = _kand_mask16(_mm512_cmpge_epu32_mask(v, vlo),
                                        _mm512_cmple_epu32_mask(v, vhi));
      // room: got + popcount <= m (the bin's count) and 16 spare entries
      _mm512_storeu_si512(bin.data() + got, _mm512_maskz_compress_epi32(in, v));
      got += size_t(__builtin_popcount(uint32_t(in)));
    }
#endif
    for (; j < n; ++j) {
      bin[got] = b[j];                                // kept only if counted: no branch
      got += size_t(b[j] >= b_lo && b[j] <= b_hi);
    }
  }
  const auto nth = bin.begin() + std::ptrdiff_t(m - size_t(rank));   // ascending index
  std::nth_element(bin.begin(), nth, bin.begin() + std::ptrdiff_t(m));
  return *nth;
}

}  // namespace window
}  // namespace AIM_CPU_NS
}  // namespace aim
