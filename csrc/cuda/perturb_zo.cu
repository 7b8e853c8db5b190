// CUDA kernel of curvkern::perturb_zo: the four perturbed copies of the zeroth-order estimator.
#include "cuda/helpers.cuh"
#include "cuda/launchers.h"
#include "mask.h"
#include "probes.h"

namespace curvkern {
namespace cuda {
namespace {

// As perturb_kernel, with two probes per lane (r from stream 0, s from stream 1) and four copies
// per probe pair, added in the order of the CPU kernel and the Python twin:
// (x + h * m * (+-r)) + h * m * (+-s).
template <typename scalar_t, bool kMasked>
__global__ void __launch_bounds__(kThreads)
    perturb_zo_kernel(const scalar_t* __restrict__ x,   // (B, D)
                      const int64_t* __restrict__ ids,  // (B,)
                      scalar_t* __restrict__ out,       // (4, n, B, D)
                      MaskView<scalar_t> mask, uint64_t seed, int64_t n, int64_t batch, int64_t dim,
                      int64_t nblk, int group, scalar_t h, int64_t offset) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t copy_stride = n * batch * dim;
  const int64_t ngroups = (n + group - 1) / group;
  const int64_t items = batch * nblk * ngroups;
  for (int64_t item = global_warp(); item < items; item += grid_warps()) {
    const int64_t grp = item % ngroups, sample_block = item / ngroups;
    const int64_t b = sample_block / nblk, blk = sample_block - b * nblk;
    const int64_t j0 = blk * kProbeBlock + lane;
    const uint64_t id = checked_id(ids, b);
    scalar_t xv[kWordsPerBlock], mv[kWordsPerBlock];
#pragma unroll
    for (int q = 0; q < kWordsPerBlock; ++q) {
      const int64_t j = j0 + q * kWarpSize;
      xv[q] = j < dim ? x[b * dim + j] : scalar_t(0);
      mv[q] = kMasked && j < dim ? mask.at(b, j) : scalar_t(1);
    }
    const int64_t k0 = grp * group;
    const ProbeWords r = probe_block(seed, 0, id, offset + k0 + lane, blk);
    const ProbeWords s = probe_block(seed, 1, id, offset + k0 + lane, blk);
    const int kn = static_cast<int>(n - k0 < group ? n - k0 : group);
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
          scalar_t hr = probe_sign<scalar_t>(wr[q], lane) * h;
          scalar_t hs = probe_sign<scalar_t>(ws[q], lane) * h;
          if (kMasked) {
            hr = mul_rn(hr, mv[q]);  // rounded before the additions, as on the CPU
            hs = mul_rn(hs, mv[q]);
          }
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

}  // namespace

template <typename scalar_t>
void launch_perturb_zo(const scalar_t* x, const int64_t* ids, scalar_t* out,
                       MaskView<scalar_t> mask, uint64_t seed, int64_t n, int64_t batch,
                       int64_t dim, scalar_t h, int64_t offset, int sm_count, cudaStream_t stream) {
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  const int group = probes_per_warp(batch * nblk, n, sm_count);
  const int grid = grid_for_warp_items(batch * nblk * ((n + group - 1) / group), sm_count);
  if (mask.values != nullptr) {
    perturb_zo_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
        x, ids, out, mask, seed, n, batch, dim, nblk, group, h, offset);
  } else {
    perturb_zo_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
        x, ids, out, mask, seed, n, batch, dim, nblk, group, h, offset);
  }
}

template void launch_perturb_zo<float>(const float*, const int64_t*, float*, MaskView<float>,
                                       uint64_t, int64_t, int64_t, int64_t, float, int64_t, int,
                                       cudaStream_t);
template void launch_perturb_zo<double>(const double*, const int64_t*, double*, MaskView<double>,
                                        uint64_t, int64_t, int64_t, int64_t, double, int64_t, int,
                                        cudaStream_t);

}  // namespace cuda
}  // namespace curvkern
