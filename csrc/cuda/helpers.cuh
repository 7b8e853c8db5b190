// Device helpers shared by the CUDA kernels. Kept free of ATen headers, so that the .cu files
// compile quickly for every architecture; tensors are handled in csrc/cuda/ops.cpp.
//
// Warp-cooperative probe generation: one Philox call yields a block of 128 probe signs. In the
// kernels, lane l of a warp generates the block it is responsible for (a different probe or a
// different block per lane), and the warp then walks over those blocks, broadcasting word q of
// block i with a shuffle from lane i. Element 32 q + l of a block is bit l of word q, so lane l
// always handles elements 32 q + l: every warp load and store covers 32 consecutive elements.
#pragma once

#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT_MSG (macros only, no ATen)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "probes.h"

#ifndef CUDA_KERNEL_ASSERT_MSG  // older torch: the assertion without its message
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

namespace curvkern {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
// Words per probe block; a block covers kWordsPerBlock * kWarpSize = 128 elements.
constexpr int kWordsPerBlock = 4;
static_assert(kWordsPerBlock * kWarpSize == kProbeBlock, "a probe block is 4 words of 32 bits");

// Word Q (a compile-time index, so the words stay in registers) of the probe block that lane
// `src` generated.
template <int Q>
__device__ __forceinline__ uint32_t shfl_word(const ProbeWords& words, int src) {
  return __shfl_sync(kFullMask, words.w[Q], src);
}

// Blocks of kThreads for a grid-stride loop over `warp_items` items of one warp each: enough to
// fill the device a few times over, no more than there are items. `blocks_per_sm`: how many
// blocks of the kernel an SM holds at once (resident_blocks_per_sm); by default the 2048 threads
// of an SM, which holds for kernels of at most 32 registers per thread.
inline int grid_for_warp_items(int64_t warp_items, int sm_count,
                               int blocks_per_sm = 2048 / kThreads) {
  const int64_t needed = (warp_items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t resident = int64_t{sm_count} * std::max(blocks_per_sm, 1);
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, 4 * resident)));
}

// Blocks of kThreads threads of `kernel` that one SM holds at once, as its registers and shared
// memory allow (a kernel of 73-100 registers per thread fits 2-3 blocks, not 8). On failure 1, and
// the error stays pending for the caller's launch check (cudaGetLastError) to report.
template <typename Kernel>
inline int resident_blocks_per_sm(Kernel kernel) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess) {
    return 1;
  }
  return std::max(blocks, 1);
}

// Probes per warp in the perturb kernels, whose items are (sample, probe block, group of probes):
// 32 (one per lane) when B * nblk items fill the device, fewer when they do not (B = 1 and a large
// n), so that there are at least as many warps as the device holds. The output does not depend on
// it.
inline int probes_per_warp(int64_t sample_blocks, int64_t n, int sm_count) {
  const int64_t resident_warps = int64_t{sm_count} * 2048 / kWarpSize;
  int group = kWarpSize;
  while (group > 1 && sample_blocks * ((n + group - 1) / group) < resident_warps) group /= 2;
  return group;
}

// a * b rounded on its own, never contracted with a following addition into one FMA (nvcc
// contracts by default). The perturb kernels add x + (sign * h) * m with a mask weight m: fused,
// the sum would be rounded once instead of twice, and a fractional mask would give results that
// differ in the last bit from the CPU kernels and the Python twin, which round the product first.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// min(remaining, 32): how many of the next 32 items (probes, blocks) exist.
__device__ __forceinline__ int warp_span(int64_t remaining) {
  return remaining < kWarpSize ? static_cast<int>(remaining) : kWarpSize;
}

// ids[b], asserted to lie in [0, 2^56) (outside it, probes of different samples or streams
// coincide). A failed device assertion is reported asynchronously, at the next synchronizing CUDA
// call, as "device-side assert triggered"; the check costs no host synchronization, so the ops
// stay capturable in CUDA graphs. It runs in release builds too (CUDA_KERNEL_ASSERT ignores
// NDEBUG).
__device__ __forceinline__ uint64_t checked_id(const int64_t* __restrict__ ids, int64_t b) {
  const int64_t id = ids[b];
  CUDA_KERNEL_ASSERT_MSG(id >= 0 && id < kMaxId, "curvkern: ids must lie in [0, 2^56)");
  return static_cast<uint64_t>(id);
}

// Global index of this thread's warp and the number of warps in the grid.
__device__ __forceinline__ int64_t global_warp() {
  return int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int64_t grid_warps() { return int64_t{gridDim.x} * kWarpsPerBlock; }

}  // namespace cuda
}  // namespace curvkern
