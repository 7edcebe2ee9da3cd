// The element math of DESIGN.md 2.1, 2.2 and 2.3, shared by the CPU (OpenMP) and
// the CUDA implementations so the two cannot drift apart (apex multi-tensor-apply
// style: one function per element, fp32 math whatever the storage dtype).
//
// Every expression is written in the order of ops/reference.py, operand by
// operand, so that with contraction off the CPU result is bit-identical to the
// reference's fp32 value and a GPU (which contracts a*b+c into an FMA) differs by
// at most an ulp of fp32.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define AIM_HD __host__ __device__ __forceinline__
#else
#define AIM_HD inline __attribute__((always_inline))
#endif

// Each CPU instruction-set build (ops_cpu.cpp, ops_cpu_avx2.cpp) gets its own copy of
// these inline functions: one name per copy, so the linker never swaps an AVX2 body
// into the baseline path.
#ifndef AIM_CPU_NS
#define AIM_CPU_NS isa_default
#endif

namespace aim {
inline namespace AIM_CPU_NS {

// dtype codes crossing the binding (python/bindings.cpp, aim_kernels/ops/native.py)
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Storage tags: raw bits, so a value nobody asked to change is written back as it was.
struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

AIM_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
AIM_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

// bf16 <-> fp32 as c10::BFloat16 does it: round to nearest even, NaN -> 0x7FC0.
AIM_HD float bf16_to_f32(uint16_t h) { return u2f(uint32_t(h) << 16); }
AIM_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f2u(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// fp16 <-> fp32, branch-free (so loops vectorise), the same algorithm as
// c10::detail::fp16_ieee_{to,from}_fp32_value: round to nearest even.
AIM_HD float f16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * u2f(0x07800000u);  // 2^-112
  const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized);
  return u2f(sign | bits);
}
AIM_HD uint16_t f32_to_f16(float f) {
  float base = (u2f(f2u(f) & 0x7FFFFFFFu) * u2f(0x77800000u)) * u2f(0x08800000u);  // 2^112, 2^-110
  const uint32_t w = f2u(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2u(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// load/store of one element of a storage type as fp32
AIM_HD float load(float v) { return v; }
AIM_HD float load(bf16_t v) { return bf16_to_f32(v.x); }
AIM_HD float load(f16_t v) { return f16_to_f32(v.x); }
template <typename T> AIM_HD T store(float v);
template <> AIM_HD float store<float>(float v) { return v; }
template <> AIM_HD bf16_t store<bf16_t>(float v) { return bf16_t{f32_to_bf16(v)}; }
template <> AIM_HD f16_t store<f16_t>(float v) { return f16_t{f32_to_f16(v)}; }

// |x| as fp32 bits: the order of these bits is the order of the values for the
// non-negative floats the radix select ranks (-0.0 counts as 0, as in the reference).
AIM_HD uint32_t abs_bits(float v) { return f2u(v) & 0x7FFFFFFFu; }
AIM_HD bool is_finite(float v) { return (f2u(v) & 0x7F800000u) != 0x7F800000u; }
// torch.sign: -1, 0, +1, and 0 for NaN (CPU and CUDA alike)
AIM_HD float sign_of(float v) { return float(v > 0.f) - float(v < 0.f); }

// DESIGN.md 2.1: u, F, F_hat and Omega are clamped to the largest finite fp32, so one huge
// gradient cannot leave an infinite importance (and 0 * inf = NaN) to the next task.
// A select, not fminf: NaN stays NaN, as torch.where in the reference, and loops vectorise.
constexpr float kFp32Max = 3.40282346638528859812e+38f;
AIM_HD float at_most_fp32_max(float v) { return v > kFp32Max ? kFp32Max : v; }

// DESIGN.md 2: c_g from a group's count and its Omega sum (both double, as the reference):
// 1 without normalize; 0 if the sum is not > 0 or n / sum overflows fp32.
AIM_HD float inv_scale_of(double n, double total, bool normalize) {
  if (!normalize) return 1.0f;
  const float c = total > 0 ? float(n / total) : 0.0f;
  return is_finite(c) ? c : 0.0f;
}

// ----------------------------------------------------------------- 2.1 fused step

struct StepScalars {          // per call: beta and the flags, as the reference rounds them
  float beta, one_minus_beta; // (float)beta and (float)(1.0 - beta), the double taken first
  bool ema, fisher_kind, directional;
};

struct GroupScalars { float c, t, kappa, lam, half_lam; };   // half_lam = 0.5f * lam

struct StepOut {
  float g_out, F_new;
  float grad_sq, out_sq, reg_sq, drift_sq, penalty;   // the stat terms of this element
  bool finite, masked;
};

AIM_HD StepOut step_element(float g, float theta, float a, float omega, float F,
                            const StepScalars& k, const GroupScalars& gs) {
  StepOut o;
  o.finite = is_finite(g);
  const float u = at_most_fp32_max(k.fisher_kind ? g * g : u2f(abs_bits(g)));
  const float ema = k.beta * F + k.one_minus_beta * u;
  const float sum = F + u;
  // one clamp per branch (not one on the selected value): the same result, and 0 extra
  // spills in the 64-register CUDA step kernel on sm_90 (measured with ptxas -v)
  o.F_new = o.finite ? (k.ema ? at_most_fp32_max(ema) : at_most_fp32_max(sum)) : F;
  const float s = gs.c * omega;
  o.masked = (omega >= gs.t) && (omega > 0.f);
  const float d = theta - a;
  const float r_all = gs.lam * s * d;
  const float r = (!k.directional || g * d < 0.f) ? r_all : 0.f;   // a select: loops vectorise
  const float g_out = (o.masked ? gs.kappa : 1.f) * g + r;
  o.g_out = g_out;
  o.grad_sq = o.finite ? g * g : 0.f;
  o.out_sq = o.finite ? g_out * g_out : 0.f;
  o.reg_sq = o.finite ? r * r : 0.f;
  o.drift_sq = d * d;
  o.penalty = gs.half_lam * s * d * d;
  return o;
}

// ----------------------------------------------------------------- 2.2 consolidation

enum Merge : int { kMergeNone = 0, kMergeFisher = 1, kMergeLinear = 2 };

struct ConsolidateScalars { float fisher_scale, decay, alpha; int merge; };

struct ConsolidateOut { float theta, omega; };

AIM_HD ConsolidateOut consolidate_element(float theta, float a, float omega, float F,
                                          const ConsolidateScalars& k) {
  const float F_hat = at_most_fp32_max(F * k.fisher_scale);
  if (k.merge == kMergeFisher) {
    const float denom = omega + k.alpha * F_hat;
    const float merged = (omega * a + k.alpha * F_hat * theta) / denom;
    theta = denom > 0.f ? merged : theta;
  } else if (k.merge == kMergeLinear) {
    theta = a + k.alpha * (theta - a);
  }
  return ConsolidateOut{theta, at_most_fp32_max(k.decay * omega + F_hat)};
}

// ----------------------------------------------------------------- 2.3 alignment

// True when theta is to be reset: |a| among the top-k of its group, a != 0, and the
// signs of theta and a differ (torch.sign semantics).
AIM_HD bool align_conflict(float theta, float a, float m) {
  const float mag = u2f(abs_bits(a));
  return (mag >= m) && (mag > 0.f) && (sign_of(theta) != sign_of(a));
}

}  // namespace AIM_CPU_NS
}  // namespace aim
