// CUDA kernel of curvkern::rademacher: materialized probes.
#include "cuda/helpers.cuh"
#include "cuda/launchers.h"
#include "probes.h"

namespace curvkern {
namespace cuda {
namespace {

// One warp per (row (k, b), segment of 32 probe blocks): lane l generates block seg + l, and the
// warp writes the segment's blocks one after the other, 32 consecutive elements per store.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rademacher_kernel(const int64_t* __restrict__ ids,  // (B,)
                      scalar_t* __restrict__ out,       // (n, B, D)
                      uint64_t seed, uint32_t stream, int64_t n, int64_t batch, int64_t dim,
                      int64_t nblk, int64_t offset) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t nseg = (nblk + kWarpSize - 1) / kWarpSize;
  for (int64_t item = global_warp(); item < n * batch * nseg; item += grid_warps()) {
    const int64_t row = item / nseg, seg = (item - row * nseg) * kWarpSize;
    const int64_t k = row / batch, b = row - k * batch;
    const ProbeWords words = probe_block(seed, stream, checked_id(ids, b), offset + k, seg + lane);
    const int nb = warp_span(nblk - seg);
    scalar_t* o = out + row * dim;
    for (int i = 0; i < nb; ++i) {
      const int64_t j0 = (seg + i) * kProbeBlock + lane;
      const uint32_t w[kWordsPerBlock] = {shfl_word<0>(words, i), shfl_word<1>(words, i),
                                          shfl_word<2>(words, i), shfl_word<3>(words, i)};
#pragma unroll
      for (int q = 0; q < kWordsPerBlock; ++q) {
        const int64_t j = j0 + q * kWarpSize;
        if (j < dim) o[j] = probe_sign<scalar_t>(w[q], lane);
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
void launch_rademacher(const int64_t* ids, scalar_t* out, uint64_t seed, uint32_t stream_id,
                       int64_t n, int64_t batch, int64_t dim, int64_t offset, int sm_count,
                       cudaStream_t stream) {
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  const int64_t nseg = (nblk + kWarpSize - 1) / kWarpSize;
  rademacher_kernel<scalar_t>
      <<<grid_for_warp_items(n * batch * nseg, sm_count), kThreads, 0, stream>>>(
          ids, out, seed, stream_id, n, batch, dim, nblk, offset);
}

template void launch_rademacher<float>(const int64_t*, float*, uint64_t, uint32_t, int64_t, int64_t,
                                       int64_t, int64_t, int, cudaStream_t);
template void launch_rademacher<double>(const int64_t*, double*, uint64_t, uint32_t, int64_t,
                                        int64_t, int64_t, int64_t, int, cudaStream_t);

}  // namespace cuda
}  // namespace curvkern
