// Device helpers shared by the CUDA kernels. Kept free of ATen headers, so that the .cu files
// compile quickly for every architecture; tensors are handled in csrc/cuda/ops.cpp.
//
// Warp-cooperative probe generation: one Philox call yields a block of 128 probe signs. In the
// kernels, lane l of a warp generates the block it is responsible for (a different probe or a
// different block per lane), and the warp then walks over those blocks, broadcasting word q of
// block i with a shuffle from lane i. Element 32 q + l of a block is bit l of word q, so lane l
// always handles elements 32 q + l: every warp load and store covers 32 consecutive elements.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "probes.h"

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
// fill the device a few times over, no more than there are items.
inline int grid_for_warp_items(int64_t warp_items, int sm_count) {
  const int64_t needed = (warp_items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t resident = int64_t{sm_count} * 2048 / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, 4 * resident)));
}

// min(remaining, 32): how many of the next 32 items (probes, blocks) exist.
__device__ __forceinline__ int warp_span(int64_t remaining) {
  return remaining < kWarpSize ? static_cast<int>(remaining) : kWarpSize;
}

// Global index of this thread's warp and the number of warps in the grid.
__device__ __forceinline__ int64_t global_warp() {
  return int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int64_t grid_warps() { return int64_t{gridDim.x} * kWarpsPerBlock; }

}  // namespace cuda
}  // namespace curvkern
