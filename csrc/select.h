// Exact k-th largest of |x| per group by radix select over the fp32 bits (DESIGN.md 2,
// 2.3 and 6): for non-negative floats the bit pattern orders like the value, so
// three histogram passes over 11 + 10 + 10 bits of the 31 non-sign bits pin the
// k-th largest exactly, ties included, with O(bins) scratch per group and without
// sorting or copying the data. Shared by the CPU and the CUDA implementations.
#pragma once

#include <cmath>
#include <cstdint>

#include "aim_math.h"

namespace aim {
inline namespace AIM_CPU_NS {
namespace select {

constexpr int kPasses = 3;
constexpr int kBins = 2048;                   // the widest digit (pass 0: bits 30..20)

AIM_HD int shift_of(int pass) { return pass == 0 ? 20 : (pass == 1 ? 10 : 0); }
AIM_HD uint32_t digit_mask(int pass) { return pass == 0 ? 0x7FFu : 0x3FFu; }
AIM_HD int top_digit(int pass) { return int(digit_mask(pass)); }

// Whether `bits` shares the digits already fixed by the passes before `pass`.
AIM_HD bool in_prefix(uint32_t bits, uint32_t prefix, int pass) {
  if (pass == 0) return true;
  const int hi = shift_of(pass) + 10;
  return (bits >> hi) == (prefix >> hi);
}
AIM_HD int digit_of(uint32_t bits, int pass) { return int((bits >> shift_of(pass)) & digit_mask(pass)); }

// k = floor(ratio * n), in double, as ops/reference.py's kth_count.
AIM_HD int64_t kth_count(double ratio, int64_t n) { return int64_t(floor(ratio * double(n))); }

// The state of one group's select between passes.
struct State {
  uint32_t prefix;      // digits fixed so far
  int64_t remaining;    // rank still to find among the elements sharing the prefix; 0 = k is 0
};

// Walks a histogram from the largest digit down to the one holding the rank, then
// fixes that digit in the prefix. `count(d)` gives bin d.
template <typename Count>
AIM_HD void walk(State& s, int pass, const Count& count) {
  int64_t above = 0;
  int digit = top_digit(pass);
  while (digit > 0 && above + int64_t(count(digit)) < s.remaining) {
    above += int64_t(count(digit));
    --digit;
  }
  s.prefix |= uint32_t(digit) << shift_of(pass);
  s.remaining -= above;
}

// The threshold the select found: +inf when k was 0 (or the group empty).
AIM_HD float result(uint32_t prefix, bool k_is_zero) {
  return k_is_zero ? u2f(0x7F800000u) : u2f(prefix);
}

}  // namespace select
}  // namespace AIM_CPU_NS
}  // namespace aim
