// CUDA kernels of curvkern::probe_reduce: per-sample probe statistics in one pass over g.
//
// Two stages, so that a few samples with large inputs still fill the device:
//   1. partials: one warp per (row (k, b), chunk of 1024 elements): sum of dg^2 and of
//      (m r) . dg over the chunk, in double, written to a (n, B, chunks, 2) workspace;
//   2. stats: one block per sample: each row's chunks summed in chunk order (||dg|| / h and
//      (m r) . dg / h), and the rows' four statistics summed over probes.
// Every sum has an order fixed by n and D alone (chunk boundaries, lane and warp assignment), so a
// sample's statistics do not depend on the batch it is reduced in or on the launch configuration.
#include <cub/warp/warp_reduce.cuh>

#include "cuda/helpers.cuh"
#include "cuda/launchers.h"
#include "mask.h"
#include "probes.h"

namespace curvkern {
namespace cuda {
namespace {

// Probe blocks whose loads one lane issues before it uses any of them: 4 x 4 elements of g and of
// g0 in flight per lane for float, half as many for double (the same bytes, fewer registers).
template <typename scalar_t>
constexpr int kBlocksInFlight = sizeof(scalar_t) == 4 ? 4 : 2;

// Stage 1. Items are (b, chunk, k) with k fastest, so that the warps running together read the
// same chunk of g0 (from L1/L2) while each reads its own row of g. In a chunk, lane l generates
// probe block 8 * chunk + l (lanes 8..31 compute unused words: the warp runs Philox once either
// way); element 32 q + l of block i is then bit l of word q of lane i's output, and lane l handles
// elements 32 q + l of every block, so every warp load covers 32 consecutive elements.
template <typename scalar_t, bool kMasked>
__global__ void __launch_bounds__(kThreads)
    probe_reduce_partial_kernel(const scalar_t* __restrict__ g0,  // (B, D)
                                const scalar_t* __restrict__ g,   // (n, B, D)
                                const int64_t* __restrict__ ids,  // (B,)
                                double* __restrict__ partial,     // (n, B, chunks, 2)
                                MaskView<scalar_t> mask, uint64_t seed, int64_t n, int64_t batch,
                                int64_t dim, int64_t nblk, int64_t chunks, int64_t offset) {
  using WarpReduce = cub::WarpReduce<double>;
  __shared__ typename WarpReduce::TempStorage reduce_storage[kWarpsPerBlock];
  constexpr int kInFlight = kBlocksInFlight<scalar_t>;
  static_assert(kReduceChunkBlocks % kInFlight == 0, "a chunk is whole groups of blocks");
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t items = n * batch * chunks;
  for (int64_t item = global_warp(); item < items; item += grid_warps()) {
    const int64_t k = item % n, sample_chunk = item / n;
    const int64_t b = sample_chunk / chunks, chunk = sample_chunk - b * chunks;
    const int64_t row = k * batch + b;
    const uint64_t id = checked_id(ids, b);
    const int64_t blk0 = chunk * kReduceChunkBlocks;
    const ProbeWords words = probe_block(seed, 0, id, offset + k, blk0 + lane);
    const int nb =
        static_cast<int>(nblk - blk0 < kReduceChunkBlocks ? nblk - blk0 : kReduceChunkBlocks);
    const scalar_t* gr = g + row * dim;
    const scalar_t* g0r = g0 + b * dim;
    double sq = 0, rd = 0;
#pragma unroll
    for (int i0 = 0; i0 < kReduceChunkBlocks; i0 += kInFlight) {
      if (i0 >= nb) break;  // warp-uniform
      scalar_t gv[kInFlight][kWordsPerBlock], g0v[kInFlight][kWordsPerBlock];
      scalar_t mv[kInFlight][kWordsPerBlock];
      // Issue all loads of kInFlight blocks first; elements past D read as 0 (d = 0).
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
#pragma unroll
        for (int q = 0; q < kWordsPerBlock; ++q) {
          const int64_t j = (blk0 + i0 + u) * kProbeBlock + q * kWarpSize + lane;
          const bool valid = i0 + u < nb && j < dim;
          gv[u][q] = valid ? gr[j] : scalar_t(0);
          g0v[u][q] = valid ? g0r[j] : scalar_t(0);
          mv[u][q] = kMasked && valid ? mask.at(b, j) : scalar_t(1);
        }
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const uint32_t w[kWordsPerBlock] = {
            shfl_word<0>(words, i0 + u), shfl_word<1>(words, i0 + u), shfl_word<2>(words, i0 + u),
            shfl_word<3>(words, i0 + u)};
#pragma unroll
        for (int q = 0; q < kWordsPerBlock; ++q) {
          // The difference in the input dtype, as on the CPU and in the twin; then double.
          double d = static_cast<double>(static_cast<scalar_t>(gv[u][q] - g0v[u][q]));
          double sign = probe_sign<double>(w[q], lane);
          if (kMasked) {
            // A masked-out element never contributes, a NaN there included (select, not
            // multiply: NaN * 0 is NaN), on every device (csrc/mask.h).
            const double m = static_cast<double>(mv[u][q]);
            d = m != 0 ? d * m : 0.0;
            sign *= m;
          }
          sq += d * d;
          rd += sign * d;
        }
      }
    }
    sq = WarpReduce(reduce_storage[warp]).Sum(sq);
    __syncwarp();
    rd = WarpReduce(reduce_storage[warp]).Sum(rd);
    __syncwarp();
    if (lane == 0) {
      partial[2 * (row * chunks + chunk)] = sq;
      partial[2 * (row * chunks + chunk) + 1] = rd;
    }
  }
}

// Stage 2. One block per sample b (grid-stride over samples); warp w handles probes
// k = w, w + 8, ...: its lanes sum the row's chunks (lane l: chunks l, l + 32, ... in order, then
// a warp reduction), and lane 0 keeps the warp's sums over its probes. The block adds the warps'
// sums in warp order.
__global__ void __launch_bounds__(kThreads)
    probe_reduce_stats_kernel(const double* __restrict__ partial,  // (n, B, chunks, 2)
                              double* __restrict__ stats,          // (B, 4)
                              int64_t n, int64_t batch, int64_t chunks, double h) {
  using WarpReduce = cub::WarpReduce<double>;
  __shared__ typename WarpReduce::TempStorage reduce_storage[kWarpsPerBlock];
  __shared__ double warp_sums[kWarpsPerBlock][4];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    double sums[4] = {0, 0, 0, 0};  // lane 0's are the warp's
    for (int64_t k = warp; k < n; k += kWarpsPerBlock) {
      const double* p = partial + 2 * (k * batch + b) * chunks;
      double sq = 0, rd = 0;
      for (int64_t c = lane; c < chunks; c += kWarpSize) {
        sq += p[2 * c];
        rd += p[2 * c + 1];
      }
      sq = WarpReduce(reduce_storage[warp]).Sum(sq);
      __syncwarp();
      rd = WarpReduce(reduce_storage[warp]).Sum(rd);
      __syncwarp();
      if (lane == 0) {
        const double c = sqrt(sq) / h, t = rd / h;
        sums[0] += c;
        sums[1] += c * c;
        sums[2] += t;
        sums[3] += t * t;
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) warp_sums[warp][i] = sums[i];
    }
    __syncthreads();
    if (threadIdx.x < 4) {
      double s = 0;
      for (int w = 0; w < kWarpsPerBlock; ++w) s += warp_sums[w][threadIdx.x];
      stats[4 * b + threadIdx.x] = s;
    }
    __syncthreads();  // warp_sums is rewritten for the next sample
  }
}

}  // namespace

template <typename scalar_t>
void launch_probe_reduce(const scalar_t* g0, const scalar_t* g, const int64_t* ids, double* partial,
                         double* stats, MaskView<scalar_t> mask, uint64_t seed, int64_t n,
                         int64_t batch, int64_t dim, double h, int64_t offset, int sm_count,
                         cudaStream_t stream) {
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  const int64_t chunks = reduce_chunks(dim);
  const int64_t items = n * batch * chunks;
  if (items > 0) {  // D == 0: no chunks, every row's sums are 0
    // Stage 1 holds many loads in flight per lane (72-100 registers per thread on sm_90), so
    // an SM fits fewer of its blocks than its 2048 threads would: the grid is sized from the
    // occupancy the compiled kernel actually has, not from an assumed 8 blocks per SM.
    // (__launch_bounds__ with a minimum of 3 blocks makes ptxas spill the masked variants.)
    const auto kernel = mask.values != nullptr ? probe_reduce_partial_kernel<scalar_t, true>
                                               : probe_reduce_partial_kernel<scalar_t, false>;
    const int grid = grid_for_warp_items(items, sm_count, resident_blocks_per_sm(kernel));
    kernel<<<grid, kThreads, 0, stream>>>(g0, g, ids, partial, mask, seed, n, batch, dim, nblk,
                                          chunks, offset);
  }
  // A few blocks per SM; more samples are taken by the grid-stride loop.
  const int stats_grid = static_cast<int>(std::min<int64_t>(
      batch, int64_t{sm_count} * resident_blocks_per_sm(probe_reduce_stats_kernel)));
  probe_reduce_stats_kernel<<<stats_grid, kThreads, 0, stream>>>(partial, stats, n, batch, chunks,
                                                                 h);
}

template void launch_probe_reduce<float>(const float*, const float*, const int64_t*, double*,
                                         double*, MaskView<float>, uint64_t, int64_t, int64_t,
                                         int64_t, double, int64_t, int, cudaStream_t);
template void launch_probe_reduce<double>(const double*, const double*, const int64_t*, double*,
                                          double*, MaskView<double>, uint64_t, int64_t, int64_t,
                                          int64_t, double, int64_t, int, cudaStream_t);

}  // namespace cuda
}  // namespace curvkern
