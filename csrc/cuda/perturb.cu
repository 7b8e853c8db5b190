// CUDA kernel of curvkern::perturb.
#include "cuda/helpers.cuh"
#include "cuda/launchers.h"
#include "probes.h"

namespace curvkern {
namespace cuda {
namespace {

// One warp per (sample b, probe block) item: it reads the block's 128 elements of x once, keeps
// them in registers (4 per lane) and writes them, perturbed, to all n copies. Lane l generates
// the probe block of probe k0 + l.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const scalar_t* __restrict__ x,   // (B, D)
                   const int64_t* __restrict__ ids,  // (B,)
                   scalar_t* __restrict__ out,       // (n, B, D)
                   uint64_t seed, int64_t n, int64_t batch, int64_t dim, int64_t nblk, scalar_t h,
                   int64_t offset) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t item = global_warp(); item < batch * nblk; item += grid_warps()) {
    const int64_t b = item / nblk, blk = item - b * nblk;
    const int64_t j0 = blk * kProbeBlock + lane;  // this lane's first element
    const uint64_t id = ids[b];
    scalar_t xv[kWordsPerBlock];
#pragma unroll
    for (int q = 0; q < kWordsPerBlock; ++q) {
      const int64_t j = j0 + q * kWarpSize;
      xv[q] = j < dim ? x[b * dim + j] : scalar_t(0);
    }
    for (int64_t k0 = 0; k0 < n; k0 += kWarpSize) {
      const ProbeWords words = probe_block(seed, 0, id, offset + k0 + lane, blk);
      const int kn = warp_span(n - k0);
      for (int kk = 0; kk < kn; ++kk) {
        scalar_t* o = out + ((k0 + kk) * batch + b) * dim;
        const uint32_t w[kWordsPerBlock] = {shfl_word<0>(words, kk), shfl_word<1>(words, kk),
                                            shfl_word<2>(words, kk), shfl_word<3>(words, kk)};
#pragma unroll
        for (int q = 0; q < kWordsPerBlock; ++q) {
          const int64_t j = j0 + q * kWarpSize;
          if (j < dim) o[j] = xv[q] + probe_sign<scalar_t>(w[q], lane) * h;
        }
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
void launch_perturb(const scalar_t* x, const int64_t* ids, scalar_t* out, uint64_t seed, int64_t n,
                    int64_t batch, int64_t dim, scalar_t h, int64_t offset, int sm_count,
                    cudaStream_t stream) {
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  perturb_kernel<scalar_t><<<grid_for_warp_items(batch * nblk, sm_count), kThreads, 0, stream>>>(
      x, ids, out, seed, n, batch, dim, nblk, h, offset);
}

template void launch_perturb<float>(const float*, const int64_t*, float*, uint64_t, int64_t,
                                    int64_t, int64_t, float, int64_t, int, cudaStream_t);
template void launch_perturb<double>(const double*, const int64_t*, double*, uint64_t, int64_t,
                                     int64_t, int64_t, double, int64_t, int, cudaStream_t);

}  // namespace cuda
}  // namespace curvkern
