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
// * Every loop over tiles bounds the group index by G: malformed offsets (offsets[G] < n)
//   leave the elements past offsets[G] untouched instead of reading past the table.
// * Built with -fmad=false (CMakeLists.txt): no a*b+c is contracted into an FMA, so on
//   fp32 the results equal the CPU backend's bit for bit.
// * The caller's current device is restored after every call (DeviceGuard).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "aim_math.h"
#include "device_guard.h"
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

struct CudaDeviceApi {
  static int get(int* device) { return int(cudaGetDevice(device)); }
  static int set(int device) { return int(cudaSetDevice(device)); }
  static void fail(int e, const char* what) { check(cudaError_t(e), what); }
};
// Ours is a static runtime: its current device is not necessarily the tensors', so set
// it for the call, and give torch its own back afterwards.
using OnDevice = DeviceGuard<CudaDeviceApi>;

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

// The group holding element `lo` at or after group `g`, skipping empty groups; `groups`
// when none does (malformed offsets with offsets[G] < n): the caller stops there.
__device__ __forceinline__ int64_t next_group(const int64_t* off, int64_t groups, int64_t g,
                                              int64_t lo) {
  while (g < groups && off[g + 1] <= lo) ++g;
  return g;
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

// 3 resident blocks per SM for fp32 params (at most 85 registers), 2 for 16-bit ones
// (at most 128), whose VEC = 8 body needs 118-128 registers. ptxas -v with sm_80/sm_90:
// at 64 registers fp32/fp32 spilled 4 bytes (CUDA 12.4) and the 16-bit kernels 24-72
// bytes (CUDA 13.0), at 80 the 16-bit ones still spilled; tests/test_cuda_build.py keeps
// every kernel at 0 spill bytes with every nvcc it finds. 16-24 warps per SM with 4-8
// elements per thread keep ~50-60 KB of loads in flight per SM, over the ~15 KB that
// HBM3 latency times bandwidth needs.
template <typename T> constexpr int step_min_blocks() { return sizeof(T) == 4 ? 3 : 2; }

template <typename T, typename S>
__global__ void __launch_bounds__(kBlock, step_min_blocks<T>())
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
      g = next_group(a.offsets, a.groups, g, lo);
      if (g >= a.groups) break;              // block-uniform: past offsets[G]
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
//
// One pass is one flat launch over tiles, like the fused step: a block walks its tiles,
// each cut where a group ends, so a dominant group gets every block of the grid whatever
// G is. Each block keeps one 2048-bin uint32 histogram in shared memory for the group it
// is in, adds it to the group's uint64 bins in global memory when the group changes (and
// before a bin could reach 2^32), and loads 128 bits per thread and step. Lanes that hit
// the same bin (Omega mostly 0 after the first consolidation) add once per warp.

struct SelState { uint32_t prefix; uint32_t unused; int64_t remaining; };

// scratch: [G, kBins] u64 histograms | [G] SelState | [G] double sums. The histograms are
// zero on entry and left zero (each pass's walk clears what it read), so no call pays a
// G x 16 KB memset: native.py keeps one zeroed scratch per device and stream.
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
                            double ratio, SelState* state, double* sums) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = off[g + 1] - off[g];
    const int64_t k = n > 0 ? select::kth_count(ratios ? ratios[g] : ratio, n) : 0;
    state[g] = SelState{0u, 0u, max(int64_t(0), min(k, n))};   // ratio in [0, 1): no clamp bites
    sums[g] = 0.0;
  }
}

// Counts `key` (a bin, or -1 for nothing) once per distinct key of the warp: all 32
// lanes must call it together (the loops below are warp-uniform for that).
__device__ __forceinline__ void count_bin(uint32_t* h, int key) {
  const unsigned peers = __match_any_sync(0xffffffffu, key);
  if (key >= 0 && int(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&h[key], uint32_t(__popc(peers)));
}

constexpr int64_t kFlushEvery = int64_t(1) << 31;   // elements: a uint32 bin cannot wrap

template <typename T>
__global__ void __launch_bounds__(kBlock)
select_hist(const T* x, int64_t n, const int64_t* off, int64_t groups, int pass,
            const SelState* state, unsigned long long* hist, double* sums, int64_t phase) {
  constexpr int VEC = vec_of<T>();
  constexpr int64_t kTile = int64_t(kBlock) * VEC * 4;
  using PT = Pack<T, VEC>;
  __shared__ uint32_t h[select::kBins];
  for (int b = threadIdx.x; b < select::kBins; b += kBlock) h[b] = 0;
  __syncthreads();
  int64_t cur = -1, since_flush = 0;
  SelState s{};
  bool counting = false;
  double sum = 0;
  auto flush = [&]() {                        // block-uniform
    __syncthreads();
    if (counting)
      for (int b = threadIdx.x; b < select::kBins; b += kBlock)
        if (h[b]) { atomicAdd(hist + cur * select::kBins + b, (unsigned long long)h[b]); h[b] = 0; }
    if (sums != nullptr) {
      const double v[1] = {sum};
      block_atomic_add<1>(v, sums + cur);     // (synchronises the block)
      sum = 0;
    } else {
      __syncthreads();
    }
    since_flush = 0;
  };
  auto one = [&](float v, bool ok) {
    if (sums != nullptr && ok) sum += double(v);
    if (!counting) return;                    // block-uniform
    const uint32_t bits = abs_bits(v);
    count_bin(h, (ok && select::in_prefix(bits, s.prefix, pass)) ? select::digit_of(bits, pass) : -1);
  };
  const int64_t tiles = (n + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int64_t lo = tile * kTile;
    const int64_t hi = min(n, lo + kTile);
    int64_t g = group_of(off, groups, lo);
    while (lo < hi) {
      g = next_group(off, groups, g, lo);
      if (g >= groups) break;                 // block-uniform: past offsets[G]
      const int64_t end = min(hi, off[g + 1]);
      if (g != cur || since_flush >= kFlushEvery) {
        if (cur >= 0) flush();
        cur = g;
        s = state[g];
        counting = s.remaining != 0;
      }
      since_flush += end - lo;
      if (counting || sums != nullptr) {      // else this segment is not read at all
        const int64_t vlo = phase >= 0 ? min(end, lo + (VEC - (lo + phase) % VEC) % VEC) : end;
        const int64_t vhi = phase >= 0 ? vlo + (end - vlo) / VEC * VEC : end;
        for (int64_t base = lo; base < vlo; base += kBlock) {
          const int64_t i = base + threadIdx.x;
          one(i < vlo ? load(x[i]) : 0.f, i < vlo);
        }
        for (int64_t base = vlo; base < vhi; base += int64_t(kBlock) * VEC) {
          const int64_t v = base + int64_t(threadIdx.x) * VEC;
          const bool ok = v < vhi;
          PT p{};
          if (ok) p = *reinterpret_cast<const PT*>(x + v);
#pragma unroll
          for (int j = 0; j < VEC; ++j) one(load(p.v[j]), ok);
        }
        for (int64_t base = vhi; base < end; base += kBlock) {
          const int64_t i = base + threadIdx.x;
          one(i < end ? load(x[i]) : 0.f, i < end);
        }
      }
      lo = end;
    }
  }
  if (cur >= 0) flush();
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
      gh[b] = 0;                                               // zero again for the next pass/call
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
int64_t tiles_of(int64_t n) {
  const int64_t tile = int64_t(kBlock) * vec_of<T>() * 4;
  return (n + tile - 1) / tile;
}

template <typename T>
void select_launch(const void* values, int64_t n, const int64_t* off, int64_t groups,
                   const double* ratios, double ratio, bool with_sums, bool normalize,
                   float* inv_scale, float* thresh, void* scratch, int device,
                   cudaStream_t stream) {
  constexpr int VEC = vec_of<T>();
  SelScratch s(scratch, groups);
  const unsigned small = unsigned(std::min<int64_t>((groups + 127) / 128, 65535));
  select_init<<<small, 128, 0, stream>>>(off, groups, ratios, ratio, s.state, s.sums);
  check(cudaGetLastError(), "select_init kernel launch");
  const int64_t phase = common_phase<VEC>({{values, sizeof(T)}});
  const unsigned blocks = unsigned(blocks_for(tiles_of<T>(n), device));
  const unsigned walkers = unsigned(std::min<int64_t>(groups, 65535));
  for (int pass = 0; pass < select::kPasses; ++pass) {
    if (n > 0) {
      select_hist<T><<<blocks, kBlock, 0, stream>>>(
          static_cast<const T*>(values), n, off, groups, pass, s.state, s.hist,
          (with_sums && pass == 0) ? s.sums : nullptr, phase);
      check(cudaGetLastError(), "select_hist kernel launch");
    }
    select_walk<<<walkers, kBlock, 0, stream>>>(groups, pass, s.state, s.hist);
    check(cudaGetLastError(), "select_walk kernel launch");
  }
  select_finish<<<small, 128, 0, stream>>>(off, groups, s.state, s.sums, normalize,
                                          with_sums ? inv_scale : nullptr, thresh);
  check(cudaGetLastError(), "select_finish kernel launch");
}

// ------------------------------------------------------------------ alignment

// DESIGN.md 2.3 given m_g: a flat grid over tiles cut at group ends, 128-bit loads; a
// pack is written back only when one of its elements is reset.
template <typename T>
__global__ void __launch_bounds__(kBlock)
align_apply(T* param, const T* anchor, int64_t n, const int64_t* off, int64_t groups,
            const float* m_g, bool zero_mode, int64_t phase) {
  constexpr int VEC = vec_of<T>();
  constexpr int64_t kTile = int64_t(kBlock) * VEC * 4;
  using PT = Pack<T, VEC>;
  const T zero = store<T>(0.0f);
  auto fix = [&](T& p, const T a, float m) {
    if (!align_conflict(load(p), load(a), m)) return false;
    p = zero_mode ? zero : a;
    return true;
  };
  const int64_t tiles = (n + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int64_t lo = tile * kTile;
    const int64_t hi = min(n, lo + kTile);
    int64_t g = group_of(off, groups, lo);
    while (lo < hi) {
      g = next_group(off, groups, g, lo);
      if (g >= groups) break;
      const int64_t end = min(hi, off[g + 1]);
      const float m = m_g[g];
      int64_t vlo = end, vhi = end;
      if (phase >= 0) {
        vlo = min(end, lo + (VEC - (lo + phase) % VEC) % VEC);
        vhi = vlo + (end - vlo) / VEC * VEC;
      }
      for (int64_t i = lo + threadIdx.x; i < vlo; i += kBlock) fix(param[i], anchor[i], m);
      for (int64_t v = vlo + int64_t(threadIdx.x) * VEC; v < vhi; v += int64_t(kBlock) * VEC) {
        PT pp = *reinterpret_cast<const PT*>(param + v);
        const PT ap = *reinterpret_cast<const PT*>(anchor + v);
        bool any = false;
#pragma unroll
        for (int j = 0; j < VEC; ++j) any |= fix(pp.v[j], ap.v[j], m);
        if (any) *reinterpret_cast<PT*>(param + v) = pp;
      }
      for (int64_t i = vhi + threadIdx.x; i < end; i += kBlock) fix(param[i], anchor[i], m);
      lo = end;
    }
  }
}

template <typename T>
void align_apply_launch(T* param, const T* anchor, int64_t n, const int64_t* off,
                        int64_t groups, const float* m_g, bool zero_mode, int device,
                        cudaStream_t stream) {
  constexpr int VEC = vec_of<T>();
  if (n == 0 || groups == 0) return;
  const int64_t phase = common_phase<VEC>({{param, sizeof(T)}, {anchor, sizeof(T)}});
  align_apply<T><<<unsigned(blocks_for(tiles_of<T>(n), device)), kBlock, 0, stream>>>(
      param, anchor, n, off, groups, m_g, zero_mode, phase);
  check(cudaGetLastError(), "align_apply kernel launch");
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

// Every kernel of this file, instantiation by instantiation: with lazy module loading
// (CUDA_MODULE_LOADING=LAZY, the default since 12.2) a kernel's module is loaded at its
// first launch, which inside a CUDA graph capture may fail. The probe loads them all.
cudaError_t load_every_kernel() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaSuccess;
  auto get = [&](const void* f) {
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, f);
  };
  const int codes[] = {kF32, kBF16, kF16};
  for (int t : codes) {
    by_dtype(t, [&](auto tv) {
      using T = decltype(tv);
      for (int st : codes) {
        by_dtype(st, [&](auto sv) {
          using S = decltype(sv);
          get(reinterpret_cast<const void*>(fused_step_kernel<T, S>));
          get(reinterpret_cast<const void*>(consolidate_kernel<T, S>));
        });
      }
      get(reinterpret_cast<const void*>(select_hist<T>));
      get(reinterpret_cast<const void*>(align_apply<T>));
    });
  }
  get(reinterpret_cast<const void*>(round_stats));
  get(reinterpret_cast<const void*>(select_init));
  get(reinterpret_cast<const void*>(select_walk));
  get(reinterpret_cast<const void*>(select_finish));
  return e;
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

int cuda_kernel_count() { return 9 * 2 + 3 * 2 + 4; }   // what load_every_kernel loads

std::string cuda_probe(int device) {
  cudaError_t e = cudaSuccess;
  try {
    OnDevice on(device);
    e = load_every_kernel();
  } catch (const std::exception& ex) {
    cudaGetLastError();
    return std::string("the CUDA kernels cannot run on device ") + std::to_string(device) + ": " +
           ex.what();
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
  OnDevice on(device);
  by_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    by_dtype(a.state_dtype, [&](auto s) {
      fused_step_launch<T, decltype(s)>(a, device, static_cast<cudaStream_t>(stream));
    });
  });
}

void cuda_group_thresholds(const ThresholdArgs& a, int device, void* stream) {
  OnDevice on(device);
  by_dtype(a.state_dtype, [&](auto t) {
    select_launch<decltype(t)>(a.importance, a.n, a.offsets, a.groups, a.ratios, a.ratio, true,
                               a.normalize, a.inv_scale, a.thresh, a.scratch, device,
                               static_cast<cudaStream_t>(stream));
  });
}

void cuda_consolidate(const ConsolidateArgs& a, int device, void* stream) {
  OnDevice on(device);
  by_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    by_dtype(a.state_dtype, [&](auto s) {
      consolidate_launch<T, decltype(s)>(a, device, static_cast<cudaStream_t>(stream));
    });
  });
}

void cuda_align(const AlignArgs& a, int device, void* stream) {
  OnDevice on(device);
  by_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    const auto st = static_cast<cudaStream_t>(stream);
    select_launch<T>(a.anchor, a.n, a.offsets, a.groups, nullptr, a.ratio, false, false, nullptr,
                     a.thresh, a.scratch, device, st);
    align_apply_launch<T>(static_cast<T*>(a.param), static_cast<const T*>(a.anchor), a.n,
                          a.offsets, a.groups, a.thresh, a.zero_mode, device, st);
  });
}

void cuda_align_apply(const AlignArgs& a, int device, void* stream) {
  OnDevice on(device);
  by_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    align_apply_launch<T>(static_cast<T*>(a.param), static_cast<const T*>(a.anchor), a.n,
                          a.offsets, a.groups, a.thresh, a.zero_mode, device,
                          static_cast<cudaStream_t>(stream));
  });
}

}  // namespace aim
