// CUDA kernel of curvkern::probe_reduce: per-sample probe statistics in one pass over g.
#include <cub/warp/warp_reduce.cuh>

#include "cuda/helpers.cuh"
#include "cuda/launchers.h"
#include "probes.h"

namespace curvkern {
namespace cuda {
namespace {

// One block per sample b (grid-stride over samples); warp w handles probes k = w, w + 8, ...
// For each row (k, b) the warp accumulates ||dg||^2 and r . dg over D, lane l generating probe
// block seg + l of each 32-block segment, then reduces across lanes. Lane 0 keeps the warp's sums
// over its probes; the block adds the warps' sums in warp order. The order of every sum depends
// on n and D alone, so a sample's statistics do not depend on the batch it is reduced in.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    probe_reduce_kernel(const scalar_t* __restrict__ g0,  // (B, D)
                        const scalar_t* __restrict__ g,   // (n, B, D)
                        const int64_t* __restrict__ ids,  // (B,)
                        scalar_t* __restrict__ stats,     // (B, 4)
                        uint64_t seed, int64_t n, int64_t batch, int64_t dim, int64_t nblk, acc_t h,
                        int64_t offset) {
  using WarpReduce = cub::WarpReduce<acc_t>;
  __shared__ typename WarpReduce::TempStorage reduce_storage[kWarpsPerBlock];
  __shared__ acc_t warp_sums[kWarpsPerBlock][4];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;

  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const uint64_t id = ids[b];
    const scalar_t* g0b = g0 + b * dim;
    acc_t sums[4] = {0, 0, 0, 0};  // lane 0's are the warp's
    for (int64_t k = warp; k < n; k += kWarpsPerBlock) {
      const scalar_t* gk = g + (k * batch + b) * dim;
      acc_t sq = 0, rd = 0;
      for (int64_t seg = 0; seg < nblk; seg += kWarpSize) {
        const ProbeWords words = probe_block(seed, 0, id, offset + k, seg + lane);
        const int nb = warp_span(nblk - seg);
        for (int i = 0; i < nb; ++i) {
          const int64_t j0 = (seg + i) * kProbeBlock + lane;
          const uint32_t w[kWordsPerBlock] = {shfl_word<0>(words, i), shfl_word<1>(words, i),
                                              shfl_word<2>(words, i), shfl_word<3>(words, i)};
#pragma unroll
          for (int q = 0; q < kWordsPerBlock; ++q) {
            const int64_t j = j0 + q * kWarpSize;
            if (j < dim) {
              const acc_t d = static_cast<acc_t>(gk[j]) - static_cast<acc_t>(g0b[j]);
              sq += d * d;
              rd += probe_sign<acc_t>(w[q], lane) * d;
            }
          }
        }
      }
      sq = WarpReduce(reduce_storage[warp]).Sum(sq);
      __syncwarp();
      rd = WarpReduce(reduce_storage[warp]).Sum(rd);
      __syncwarp();
      if (lane == 0) {
        const acc_t c = sqrt(sq) / h, t = rd / h;
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
      acc_t s = 0;
      for (int w = 0; w < kWarpsPerBlock; ++w) s += warp_sums[w][threadIdx.x];
      stats[4 * b + threadIdx.x] = static_cast<scalar_t>(s);
    }
    __syncthreads();  // warp_sums is rewritten for the next sample
  }
}

}  // namespace

template <typename scalar_t>
void launch_probe_reduce(const scalar_t* g0, const scalar_t* g, const int64_t* ids, scalar_t* stats,
                         uint64_t seed, int64_t n, int64_t batch, int64_t dim, double h,
                         int64_t offset, cudaStream_t stream) {
  // float accumulates in float, double in double (at::acc_type on CUDA).
  using acc_t = scalar_t;
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  const int grid = static_cast<int>(std::min<int64_t>(batch, 65535));
  probe_reduce_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
      g0, g, ids, stats, seed, n, batch, dim, nblk, static_cast<acc_t>(h), offset);
}

template void launch_probe_reduce<float>(const float*, const float*, const int64_t*, float*,
                                         uint64_t, int64_t, int64_t, int64_t, double, int64_t,
                                         cudaStream_t);
template void launch_probe_reduce<double>(const double*, const double*, const int64_t*, double*,
                                          uint64_t, int64_t, int64_t, int64_t, double, int64_t,
                                          cudaStream_t);

}  // namespace cuda
}  // namespace curvkern
