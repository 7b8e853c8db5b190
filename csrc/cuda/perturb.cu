// CUDA kernel of curvkern::perturb.
#include "cuda/helpers.cuh"
#include "cuda/launchers.h"
#include "mask.h"
#include "probes.h"

namespace curvkern {
namespace cuda {
namespace {

// One warp per (sample b, probe block, group of `group` probes) item: it reads the block's 128
// elements of x (and their mask weights) once, keeps them in registers (4 per lane) and writes
// them, perturbed, to the group's copies. Lane l < group generates the probe block of probe
// k0 + l. With a mask the step is (sign * h) * m, as in the CPU kernel.
template <typename scalar_t, bool kMasked>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const scalar_t* __restrict__ x,   // (B, D)
                   const int64_t* __restrict__ ids,  // (B,)
                   scalar_t* __restrict__ out,       // (n, B, D)
                   MaskView<scalar_t> mask, uint64_t seed, int64_t n, int64_t batch, int64_t dim,
                   int64_t nblk, int group, scalar_t h, int64_t offset) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t ngroups = (n + group - 1) / group;
  const int64_t items = batch * nblk * ngroups;
  for (int64_t item = global_warp(); item < items; item += grid_warps()) {
    // item = (b * nblk + blk) * ngroups + grp: warps next to each other share x's block
    const int64_t grp = item % ngroups, sample_block = item / ngroups;
    const int64_t b = sample_block / nblk, blk = sample_block - b * nblk;
    const int64_t j0 = blk * kProbeBlock + lane;  // this lane's first element
    const uint64_t id = checked_id(ids, b);
    scalar_t xv[kWordsPerBlock], mv[kWordsPerBlock];
#pragma unroll
    for (int q = 0; q < kWordsPerBlock; ++q) {
      const int64_t j = j0 + q * kWarpSize;
      xv[q] = j < dim ? x[b * dim + j] : scalar_t(0);
      mv[q] = kMasked && j < dim ? mask.at(b, j) : scalar_t(1);
    }
    const int64_t k0 = grp * group;
    const ProbeWords words = probe_block(seed, 0, id, offset + k0 + lane, blk);
    const int kn = static_cast<int>(n - k0 < group ? n - k0 : group);
    for (int kk = 0; kk < kn; ++kk) {
      scalar_t* o = out + ((k0 + kk) * batch + b) * dim;
      const uint32_t w[kWordsPerBlock] = {shfl_word<0>(words, kk), shfl_word<1>(words, kk),
                                          shfl_word<2>(words, kk), shfl_word<3>(words, kk)};
#pragma unroll
      for (int q = 0; q < kWordsPerBlock; ++q) {
        const int64_t j = j0 + q * kWarpSize;
        const scalar_t step = probe_sign<scalar_t>(w[q], lane) * h;
        if (j < dim) o[j] = xv[q] + (kMasked ? mul_rn(step, mv[q]) : step);
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
void launch_perturb(const scalar_t* x, const int64_t* ids, scalar_t* out, MaskView<scalar_t> mask,
                    uint64_t seed, int64_t n, int64_t batch, int64_t dim, scalar_t h,
                    int64_t offset, int sm_count, cudaStream_t stream) {
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  const int group = probes_per_warp(batch * nblk, n, sm_count);
  const int grid = grid_for_warp_items(batch * nblk * ((n + group - 1) / group), sm_count);
  if (mask.values != nullptr) {
    perturb_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(x, ids, out, mask, seed, n, batch,
                                                                  dim, nblk, group, h, offset);
  } else {
    perturb_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
        x, ids, out, mask, seed, n, batch, dim, nblk, group, h, offset);
  }
}

template void launch_perturb<float>(const float*, const int64_t*, float*, MaskView<float>, uint64_t,
                                    int64_t, int64_t, int64_t, float, int64_t, int, cudaStream_t);
template void launch_perturb<double>(const double*, const int64_t*, double*, MaskView<double>,
                                     uint64_t, int64_t, int64_t, int64_t, double, int64_t, int,
                                     cudaStream_t);

}  // namespace cuda
}  // namespace curvkern
