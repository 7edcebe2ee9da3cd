// CUDA implementation. The element math is csrc/aim_math.h's, fp32 whatever the storage.
//
// * Grid-stride over tiles of the flat buffer; a tile is cut where a group ends, the
//   group found from `offsets` by a binary search per tile (no per-element group
//   array). Every thread of a block sees the same tiles and cuts, so the per-group
//   reductions below are block-uniform.
// * 128-bit loads where every array has the same misalignment (the common case, and
//   also a view at any element offset of flat buffers allocated together); a short
//   scalar head and tail around the vector body, and a scalar path otherwise.
// * int64 sizes and offsets throughout.
// * Stats: per thread in fp32 within a segment, folded into double; per block a
//   shuffle + shared-memory reduction, then one atomic per (block, group, column)
//   into a double scratch, rounded to fp32 [G, 7] by a last tiny kernel.
// * No host sync and no allocation: scratch and outputs come from Python; memsets and
//   launches go to the caller's stream, so a CUDA graph can capture a step. Every
//   launch is checked and a failure raised.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "aim_math.h"
#include "ops.h"
#include "select.h"

#ifndef AIM_CUDA_ARCH_LIST
#define AIM_CUDA_ARCH_LIST "unknown"
#endif

namespace aim {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("aim_kernels CUDA: ") + what + " failed: " +
                             cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
  }
}

int sm_count(int device) {
  static int cache[128] = {0};
  if (device >= 0 && device < 128 && cache[device]) return cache[device];
  int count = 0;
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  if (device >= 0 && device < 128) cache[device] = count;
  return count;
}

// Ours is a static runtime: its current device is not the one torch set, so set it.
void use_device(int device) { check(cudaSetDevice(device), "cudaSetDevice"); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <typename T> constexpr int vec_of() { return int(16 / sizeof(T)); }

// Index phase shared by all arrays (element i starts a pack when (i + phase) % VEC
// == 0), or -1 when their misalignments differ: then only the scalar path is safe.
template <int VEC>
int64_t common_phase(std::initializer_list<std::pair<const void*, size_t>> arrays) {
  int64_t phase = -2;
  for (auto& [p, size] : arrays) {
    const int64_t ph = int64_t((reinterpret_cast<uintptr_t>(p) / size) % VEC);
    if (phase == -2) phase = ph;
    else if (ph != phase) return -1;
  }
  return phase < 0 ? 0 : phase;
}

__device__ __forceinline__ int64_t group_of(const int64_t* off, int64_t groups, int64_t i) {
  int64_t lo = 0, hi = groups;               // first g with off[g + 1] > i
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (off[mid + 1] > i) hi = mid; else lo = mid + 1;
  }
  return lo;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Adds every thread's `vals[0, C)` into out[0, C): one atomic per column and block.
template <int C>
__device__ void block_atomic_add(const double (&vals)[C], double* out) {
  __shared__ double red[kWarps][C];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const double v = warp_sum(vals[c]);
    if (lane == 0) red[warp][c] = v;
  }
  __syncthreads();
  if (threadIdx.x < C) {
    double s = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w][threadIdx.x];
    atomicAdd(out + threadIdx.x, s);
  }
  __syncthreads();          // `red` is reused by the next call
}

// ------------------------------------------------------------------ fused step

struct Acc {
  float grad_sq = 0, out_sq = 0, reg_sq = 0, drift_sq = 0, penalty = 0;
  uint32_t masked = 0, nonfinite = 0;
};

template <typename T, typename S>
__device__ __forceinline__ void step_one(T& g, const T p, const T a, const S om, S& F,
                                         const StepScalars& k, const GroupScalars& gs, Acc& acc) {
  const StepOut o = step_element(load(g), load(p), load(a), load(om), load(F), k, gs);
  if (o.finite) {            // else g and F keep their bits (NaN payloads included)
    g = store<T>(o.g_out);
    F = store<S>(o.F_new);
  }
  acc.grad_sq += o.grad_sq; acc.out_sq += o.out_sq; acc.reg_sq += o.reg_sq;
  acc.drift_sq += o.drift_sq; acc.penalty += o.penalty;
  acc.masked += o.masked ? 1u : 0u; acc.nonfinite += o.finite ? 0u : 1u;
}

// 4 resident blocks per SM: at most 64 registers, enough warps in flight to cover
// the memory latency this bandwidth-bound kernel lives on.
template <typename T, typename S>
__global__ void __launch_bounds__(kBlock, 4)
fused_step_kernel(StepArgs a, StepScalars k, int64_t phase) {
  constexpr int VEC = vec_of<T>();
  constexpr int64_t kTile = int64_t(kBlock) * VEC * 4;
  using PT = Pack<T, VEC>;
  using PS = Pack<S, VEC>;
  T* grad = static_cast<T*>(a.grad);
  const T* param = static_cast<const T*>(a.param);
  const T* anchor = static_cast<const T*>(a.anchor);
  const S* imp = static_cast<const S*>(a.importance);
  S* fisher = static_cast<S*>(a.fisher);

  double tot[7] = {0, 0, 0, 0, 0, 0, 0};
  int64_t cur = -1;
  GroupScalars gs{};
  const int64_t tiles = (a.n + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int64_t lo = tile * kTile;
    const int64_t hi = min(a.n, lo + kTile);
    int64_t g = group_of(a.offsets, a.groups, lo);
    while (lo < hi) {
      while (a.offsets[g + 1] <= lo) ++g;    // empty groups
      const int64_t end = min(hi, a.offsets[g + 1]);
      if (g != cur) {                        // block-uniform: same lo, hi, g everywhere
        if (cur >= 0) block_atomic_add<7>(tot, a.scratch + cur * 7);
        for (double& t : tot) t = 0;
        cur = g;
        gs = GroupScalars{a.inv_scale[g], a.thresh[g], a.keep[g], a.lam[g], 0.5f * a.lam[g]};
      }
      Acc acc;
      auto scalar = [&](int64_t i) { step_one(grad[i], param[i], anchor[i], imp[i], fisher[i], k, gs, acc); };
      if (phase >= 0) {
        const int64_t vlo = min(end, lo + (VEC - (lo + phase) % VEC) % VEC);
        const int64_t vhi = vlo + (end - vlo) / VEC * VEC;
        for (int64_t i = lo + threadIdx.x; i < vlo; i += kBlock) scalar(i);
        for (int64_t v = vlo + int64_t(threadIdx.x) * VEC; v < vhi; v += int64_t(kBlock) * VEC) {
          PT gp = *reinterpret_cast<const PT*>(grad + v);
          const PT pp = *reinterpret_cast<const PT*>(param + v);
          const PT ap = *reinterpret_cast<const PT*>(anchor + v);
          const PS op = *reinterpret_cast<const PS*>(imp + v);
          PS fp = *reinterpret_cast<const PS*>(fisher + v);
#pragma unroll
          for (int j = 0; j < VEC; ++j) step_one(gp.v[j], pp.v[j], ap.v[j], op.v[j], fp.v[j], k, gs, acc);
          *reinterpret_cast<PT*>(grad + v) = gp;
          *reinterpret_cast<PS*>(fisher + v) = fp;
        }
        for (int64_t i = vhi + threadIdx.x; i < end; i += kBlock) scalar(i);
      } else {
        for (int64_t i = lo + threadIdx.x; i < end; i += kBlock) scalar(i);
      }
      tot[0] += acc.grad_sq; tot[1] += acc.out_sq; tot[2] += acc.reg_sq;
      tot[3] += acc.drift_sq; tot[4] += acc.penalty;
      tot[5] += double(acc.masked); tot[6] += double(acc.nonfinite);
      lo = end;
    }
  }
  if (cur >= 0) block_atomic_add<7>(tot, a.scratch + cur * 7);
}

__global__ void round_stats(const double* in, float* out, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = float(in[i]);
}

int64_t blocks_for(int64_t work, int device, int per_sm = 8) {
  return std::max<int64_t>(1, std::min<int64_t>(work, int64_t(sm_count(device)) * per_sm));
}

template <typename T, typename S>
void fused_step_launch(const StepArgs& a, int device, cudaStream_t stream) {
  constexpr int VEC = vec_of<T>();
  const StepScalars k{float(a.beta), float(1.0 - a.beta), a.ema, a.fisher_kind, a.directional};
  const int64_t cells = a.groups * 7;
  check(cudaMemsetAsync(a.scratch, 0, size_t(cells) * sizeof(double), stream), "cudaMemsetAsync");
  if (a.n > 0) {
    const int64_t phase = common_phase<VEC>({{a.grad, sizeof(T)}, {a.param, sizeof(T)},
                                             {a.anchor, sizeof(T)}, {a.importance, sizeof(S)},
                                             {a.fisher, sizeof(S)}});
    const int64_t tiles = (a.n + int64_t(kBlock) * VEC * 4 - 1) / (int64_t(kBlock) * VEC * 4);
    fused_step_kernel<T, S><<<unsigned(blocks_for(tiles, device)), kBlock, 0, stream>>>(a, k, phase);
    check(cudaGetLastError(), "fused_step kernel launch");
  }
  round_stats<<<unsigned((cells + 255) / 256), 256, 0, stream>>>(a.scratch, a.stats, cells);
  check(cudaGetLastError(), "fused_step stats kernel launch");
}

// ------------------------------------------------------------------ consolidation

template <typename T, typename S>
__device__ __forceinline__ void consolidate_one(T& p, T& an, S& om, S& F,
                                                const ConsolidateScalars& k) {
  const ConsolidateOut o = consolidate_element(load(p), load(an), load(om), load(F), k);
  if (k.merge != kMergeNone) p = store<T>(o.theta);    // merge=None: theta's bits unchanged
  an = p;                                              // a = theta as stored
  om = store<S>(o.omega);
  F = store<S>(0.0f);
}

template <typename T, typename S>
__global__ void __launch_bounds__(kBlock, 4)
consolidate_kernel(ConsolidateArgs a, ConsolidateScalars k, int64_t phase) {
  constexpr int VEC = vec_of<T>();
  using PT = Pack<T, VEC>;
  using PS = Pack<S, VEC>;
  T* param = static_cast<T*>(a.param);
  T* anchor = static_cast<T*>(a.anchor);
  S* imp = static_cast<S*>(a.importance);
  S* fisher = static_cast<S*>(a.fisher);
  const int64_t tid = blockIdx.x * int64_t(kBlock) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kBlock;
  int64_t vlo = a.n, vhi = a.n;          // scalar head [0, vlo), tail [vhi, n)
  if (phase >= 0) {
    vlo = min(a.n, int64_t((VEC - phase % VEC) % VEC));
    vhi = vlo + (a.n - vlo) / VEC * VEC;
    for (int64_t v = vlo + tid * VEC; v < vhi; v += stride * VEC) {
      PT pp = *reinterpret_cast<const PT*>(param + v);
      PT ap = *reinterpret_cast<const PT*>(anchor + v);
      PS op = *reinterpret_cast<const PS*>(imp + v);
      PS fp = *reinterpret_cast<const PS*>(fisher + v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) consolidate_one(pp.v[j], ap.v[j], op.v[j], fp.v[j], k);
      *reinterpret_cast<PT*>(param + v) = pp;
      *reinterpret_cast<PT*>(anchor + v) = ap;
      *reinterpret_cast<PS*>(imp + v) = op;
      *reinterpret_cast<PS*>(fisher + v) = fp;
    }
  }
  for (int64_t i = tid; i < vlo; i += stride) consolidate_one(param[i], anchor[i], imp[i], fisher[i], k);
  for (int64_t i = vhi + tid; i < a.n; i += stride) consolidate_one(param[i], anchor[i], imp[i], fisher[i], k);
}

template <typename T, typename S>
void consolidate_launch(const ConsolidateArgs& a, int device, cudaStream_t stream) {
  constexpr int VEC = vec_of<T>();
  if (a.n == 0) return;
  const ConsolidateScalars k{float(a.fisher_scale), float(a.decay), float(a.alpha), a.merge};
  const int64_t phase = common_phase<VEC>({{a.param, sizeof(T)}, {a.anchor, sizeof(T)},
                                           {a.importance, sizeof(S)}, {a.fisher, sizeof(S)}});
  const int64_t work = (a.n + int64_t(kBlock) * VEC - 1) / (int64_t(kBlock) * VEC);
  consolidate_kernel<T, S><<<unsigned(blocks_for(work, device)), kBlock, 0, stream>>>(a, k, phase);
  check(cudaGetLastError(), "consolidate_ kernel launch");
}

// ------------------------------------------------------------------ radix select

struct SelState { uint32_t prefix; uint32_t unused; int64_t remaining; };

// scratch: [G, kBins] u64 histograms | [G] SelState | [G] double sums
struct SelScratch {
  unsigned long long* hist; SelState* state; double* sums;
  SelScratch(void* p, int64_t groups)
      : hist(static_cast<unsigned long long*>(p)),
        state(reinterpret_cast<SelState*>(hist + groups * select::kBins)),
        sums(reinterpret_cast<double*>(state + groups)) {}
  static size_t bytes(int64_t groups) {
    return size_t(groups) * (select::kBins * sizeof(unsigned long long) + sizeof(SelState) +
                             sizeof(double));
  }
};

__global__ void select_init(const int64_t* off, int64_t groups, const double* ratios,
                            double ratio, SelState* state) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = off[g + 1] - off[g];
    const int64_t k = n > 0 ? select::kth_count(ratios ? ratios[g] : ratio, n) : 0;
    state[g] = SelState{0u, 0u, max(int64_t(0), min(k, n))};   // ratio in [0, 1): no clamp bites
  }
}

// One pass: per group (blockIdx.y), a 2048-bin shared histogram of the digit of the
// elements that share the prefix, then its non-zero bins added to the group's.
// Pass 0 also sums the values (in double, as the reference) when `sums` is given.
template <typename T>
__global__ void __launch_bounds__(kBlock)
select_hist(const T* x, const int64_t* off, int64_t groups, int pass, const SelState* state,
            unsigned long long* hist, double* sums) {
  __shared__ uint32_t h[select::kBins];
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    const SelState s = state[g];
    if (s.remaining == 0 && sums == nullptr) continue;        // block-uniform
    for (int b = threadIdx.x; b < select::kBins; b += kBlock) h[b] = 0;
    __syncthreads();
    double sum = 0;
    const int64_t hi = off[g + 1];
    for (int64_t i = off[g] + blockIdx.x * int64_t(kBlock) + threadIdx.x; i < hi;
         i += int64_t(gridDim.x) * kBlock) {
      const float v = load(x[i]);
      if (sums != nullptr) sum += double(v);
      const uint32_t bits = abs_bits(v);
      if (s.remaining != 0 && select::in_prefix(bits, s.prefix, pass))
        atomicAdd(&h[select::digit_of(bits, pass)], 1u);
    }
    __syncthreads();
    if (s.remaining != 0)
      for (int b = threadIdx.x; b < select::kBins; b += kBlock)
        if (h[b]) atomicAdd(hist + g * select::kBins + b, (unsigned long long)h[b]);
    if (sums != nullptr) {
      const double v[1] = {sum};
      block_atomic_add<1>(v, sums + g);
    }
    __syncthreads();
  }
}

// Fixes one digit per group from its histogram and clears the histogram: the block
// stages the bins in shared memory (coalesced), then one thread walks them there, so
// the walk's loop-carried dependence costs shared-memory latency, not global.
__global__ void __launch_bounds__(kBlock)
select_walk(int64_t groups, int pass, SelState* state, unsigned long long* hist) {
  __shared__ unsigned long long h[select::kBins];
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const SelState s = state[g];
    if (s.remaining == 0) continue;                            // block-uniform
    unsigned long long* gh = hist + g * select::kBins;
    for (int b = threadIdx.x; b < select::kBins; b += kBlock) {
      h[b] = gh[b];
      gh[b] = 0;                                               // ready for the next pass
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      select::State st{s.prefix, s.remaining};
      select::walk(st, pass, [&](int d) { return h[d]; });
      state[g] = SelState{st.prefix, 0u, st.remaining};
    }
    __syncthreads();
  }
}

__global__ void select_finish(const int64_t* off, int64_t groups, const SelState* state,
                              const double* sums, bool normalize, float* inv_scale,
                              float* thresh) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    thresh[g] = select::result(state[g].prefix, state[g].remaining == 0);
    if (inv_scale) {
      const double n = double(off[g + 1] - off[g]), total = sums[g];
      inv_scale[g] = inv_scale_of(n, total, normalize);
    }
  }
}

template <typename T>
void select_launch(const void* values, const int64_t* off, int64_t groups, const double* ratios,
                   double ratio, bool with_sums, bool normalize, float* inv_scale, float* thresh,
                   void* scratch, int device, cudaStream_t stream) {
  SelScratch s(scratch, groups);
  check(cudaMemsetAsync(scratch, 0, SelScratch::bytes(groups), stream), "cudaMemsetAsync");
  const unsigned small = unsigned(std::min<int64_t>((groups + 127) / 128, 65535));
  select_init<<<small, 128, 0, stream>>>(off, groups, ratios, ratio, s.state);
  check(cudaGetLastError(), "select_init kernel launch");
  const unsigned gy = unsigned(std::min<int64_t>(groups, 65535));
  const unsigned gx = unsigned(std::max<int64_t>(1, std::min<int64_t>(
      1024, (int64_t(sm_count(device)) * 4 + gy - 1) / gy)));
  for (int pass = 0; pass < select::kPasses; ++pass) {
    select_hist<T><<<dim3(gx, gy), kBlock, 0, stream>>>(
        static_cast<const T*>(values), off, groups, pass, s.state, s.hist,
        (with_sums && pass == 0) ? s.sums : nullptr);
    check(cudaGetLastError(), "select_hist kernel launch");
    select_walk<<<gy, kBlock, 0, stream>>>(groups, pass, s.state, s.hist);
    check(cudaGetLastError(), "select_walk kernel launch");
  }
  select_finish<<<small, 128, 0, stream>>>(off, groups, s.state, s.sums, normalize,
                                          with_sums ? inv_scale : nullptr, thresh);
  check(cudaGetLastError(), "select_finish kernel launch");
}

// ------------------------------------------------------------------ alignment

template <typename T>
__global__ void __launch_bounds__(kBlock)
align_apply(T* param, const T* anchor, const int64_t* off, int64_t groups, const float* thresh,
            bool zero_mode) {
  const T zero = store<T>(0.0f);
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    const float m = thresh[g];
    const int64_t hi = off[g + 1];
    for (int64_t i = off[g] + blockIdx.x * int64_t(kBlock) + threadIdx.x; i < hi;
         i += int64_t(gridDim.x) * kBlock) {
      const T a = anchor[i];
      if (align_conflict(load(param[i]), load(a), m)) param[i] = zero_mode ? zero : a;
    }
  }
}

// ------------------------------------------------------------------ dtype dispatch

template <typename F>
void by_dtype(int code, F&& f) {
  switch (code) {
    case kF32: return f(float{});
    case kBF16: return f(bf16_t{});
    case kF16: return f(f16_t{});
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(code));
}

}  // namespace

int cuda_runtime_version() { return CUDART_VERSION; }

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  return v;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string cuda_probe(int device) {
  cudaError_t e = cudaSetDevice(device);
  if (e == cudaSuccess) {
    cudaFuncAttributes attr;
    e = cudaFuncGetAttributes(&attr, fused_step_kernel<float, float>);
  }
  if (e == cudaSuccess) return "";
  cudaGetLastError();
  return std::string("the CUDA kernels cannot run on device ") + std::to_string(device) + ": " +
         cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + "); built for sm " +
         AIM_CUDA_ARCH_LIST + " with CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
         std::to_string(CUDART_VERSION % 1000 / 10);
}

std::string cuda_archs() { return AIM_CUDA_ARCH_LIST; }

size_t cuda_threshold_scratch_bytes(int64_t groups) { return SelScratch::bytes(groups); }

void cuda_fused_step(const StepArgs& a, int device, void* stream) {
  use_device(device);
  by_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    by_dtype(a.state_dtype, [&](auto s) {
      fused_step_launch<T, decltype(s)>(a, device, static_cast<cudaStream_t>(stream));
    });
  });
}

void cuda_group_thresholds(const ThresholdArgs& a, int device, void* stream) {
  use_device(device);
  by_dtype(a.state_dtype, [&](auto t) {
    select_launch<decltype(t)>(a.importance, a.offsets, a.groups, a.ratios, a.ratio, true,
                               a.normalize, a.inv_scale, a.thresh, a.scratch, device,
                               static_cast<cudaStream_t>(stream));
  });
}

void cuda_consolidate(const ConsolidateArgs& a, int device, void* stream) {
  use_device(device);
  by_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    by_dtype(a.state_dtype, [&](auto s) {
      consolidate_launch<T, decltype(s)>(a, device, static_cast<cudaStream_t>(stream));
    });
  });
}

void cuda_align(const AlignArgs& a, int device, void* stream) {
  use_device(device);
  by_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    const auto st = static_cast<cudaStream_t>(stream);
    select_launch<T>(a.anchor, a.offsets, a.groups, nullptr, a.ratio, false, false, nullptr,
                     a.thresh, a.scratch, device, st);
    const unsigned gy = unsigned(std::min<int64_t>(a.groups, 65535));
    const unsigned gx = unsigned(std::max<int64_t>(1, std::min<int64_t>(
        1024, (int64_t(sm_count(device)) * 4 + gy - 1) / gy)));
    align_apply<T><<<dim3(gx, gy), kBlock, 0, st>>>(static_cast<T*>(a.param),
                                                     static_cast<const T*>(a.anchor), a.offsets,
                                                     a.groups, a.thresh, a.zero_mode);
    check(cudaGetLastError(), "align_ kernel launch");
  });
}

}  // namespace aim
