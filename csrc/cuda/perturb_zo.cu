// CUDA kernel of curvkern::perturb_zo: the four perturbed copies of the zeroth-order estimator.
#include "cuda/helpers.cuh"
#include "cuda/launchers.h"
#include "probes.h"

namespace curvkern {
namespace cuda {
namespace {

// As perturb_kernel, with two probes per lane (r from stream 0, s from stream 1) and four copies
// per probe pair, added in the order of the CPU kernel and the Python twin:
// (x + h * (+-r)) + h * (+-s).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    perturb_zo_kernel(const scalar_t* __restrict__ x,   // (B, D)
                      const int64_t* __restrict__ ids,  // (B,)
                      scalar_t* __restrict__ out,       // (4, n, B, D)
                      uint64_t seed, int64_t n, int64_t batch, int64_t dim, int64_t nblk,
                      scalar_t h, int64_t offset) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t copy_stride = n * batch * dim;
  for (int64_t item = global_warp(); item < batch * nblk; item += grid_warps()) {
    const int64_t b = item / nblk, blk = item - b * nblk;
    const int64_t j0 = blk * kProbeBlock + lane;
    const uint64_t id = ids[b];
    scalar_t xv[kWordsPerBlock];
#pragma unroll
    for (int q = 0; q < kWordsPerBlock; ++q) {
      const int64_t j = j0 + q * kWarpSize;
      xv[q] = j < dim ? x[b * dim + j] : scalar_t(0);
    }
    for (int64_t k0 = 0; k0 < n; k0 += kWarpSize) {
      const ProbeWords r = probe_block(seed, 0, id, offset + k0 + lane, blk);
      const ProbeWords s = probe_block(seed, 1, id, offset + k0 + lane, blk);
      const int kn = warp_span(n - k0);
      for (int kk = 0; kk < kn; ++kk) {
        scalar_t* o = out + ((k0 + kk) * batch + b) * dim;
        const uint32_t wr[kWordsPerBlock] = {shfl_word<0>(r, kk), shfl_word<1>(r, kk),
                                             shfl_word<2>(r, kk), shfl_word<3>(r, kk)};
        const uint32_t ws[kWordsPerBlock] = {shfl_word<0>(s, kk), shfl_word<1>(s, kk),
                                             shfl_word<2>(s, kk), shfl_word<3>(s, kk)};
#pragma unroll
        for (int q = 0; q < kWordsPerBlock; ++q) {
          const int64_t j = j0 + q * kWarpSize;
          if (j < dim) {
            const scalar_t hr = probe_sign<scalar_t>(wr[q], lane) * h;
            const scalar_t hs = probe_sign<scalar_t>(ws[q], lane) * h;
            const scalar_t plus = xv[q] + hr, minus = xv[q] - hr;
            o[j] = plus + hs;
            o[copy_stride + j] = minus + hs;
            o[2 * copy_stride + j] = plus - hs;
            o[3 * copy_stride + j] = minus - hs;
          }
        }
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
void launch_perturb_zo(const scalar_t* x, const int64_t* ids, scalar_t* out, uint64_t seed,
                       int64_t n, int64_t batch, int64_t dim, scalar_t h, int64_t offset,
                       int sm_count, cudaStream_t stream) {
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  perturb_zo_kernel<scalar_t><<<grid_for_warp_items(batch * nblk, sm_count), kThreads, 0, stream>>>(
      x, ids, out, seed, n, batch, dim, nblk, h, offset);
}

template void launch_perturb_zo<float>(const float*, const int64_t*, float*, uint64_t, int64_t,
                                       int64_t, int64_t, float, int64_t, int, cudaStream_t);
template void launch_perturb_zo<double>(const double*, const int64_t*, double*, uint64_t, int64_t,
                                        int64_t, int64_t, double, int64_t, int, cudaStream_t);

}  // namespace cuda
}  // namespace curvkern
