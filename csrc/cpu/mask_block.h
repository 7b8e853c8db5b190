// Probe-mask weights of one probe block, for the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "mask.h"
#include "probes.h"

namespace curvkern {
namespace cpu {

// Whether elements j0 .. j0 + len - 1 of a sample lie in one run of the mask (the usual case:
// runs of whole rows, channels or token embeddings of 128 elements or more); then *weight is that
// run's value for sample b.
template <typename scalar_t>
inline bool block_in_one_run(const MaskView<scalar_t>& mask, int64_t b, int64_t j0, int len,
                             scalar_t* weight) {
  const int64_t first = mask.position(j0);
  if (first != mask.position(j0 + len - 1)) return false;
  *weight = mask.values[b * mask.parts + first];
  return true;
}

// out[0 .. len) = weights of elements j0 .. j0 + len - 1 of sample b, filled run by run (one
// division per block, not per element).
template <typename T, typename scalar_t>
inline void block_weights(const MaskView<scalar_t>& mask, int64_t b, int64_t j0, int len, T* out) {
  const scalar_t* row = mask.values + b * mask.parts;
  const int64_t run = static_cast<int64_t>(mask.position.run);
  int64_t column = mask.position(j0);
  int64_t left = (column + 1) * run - j0;  // elements of this run from j0 on
  for (int j = 0; j < len; ++column, left = run) {
    const int count = static_cast<int>(std::min<int64_t>(left, len - j));
    std::fill(out + j, out + j + count, static_cast<T>(row[column]));
    j += count;
  }
}

// The loop of the perturb kernels: fn(b, blk, j0, len, m) for every (sample b, probe block blk)
// of a (B, D) batch, in parallel, where the block holds elements j0 .. j0 + len - 1 and m[0 .. len)
// are their mask weights (kMasked; unset otherwise). Each call writes that block of every
// perturbed copy, so x is read once and every output element written once.
template <typename scalar_t, bool kMasked, typename Fn>
inline void for_each_sample_block(const MaskView<scalar_t>& mask, int64_t batch, int64_t dim,
                                  const Fn& fn) {
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  at::parallel_for(0, batch * nblk, 16, [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t m[kProbeBlock];  // (128,) mask weights of the block
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nblk, blk = item % nblk;
      const int64_t j0 = blk * kProbeBlock;
      const int len = static_cast<int>(std::min(kProbeBlock, dim - j0));
      if (kMasked) block_weights(mask, b, j0, len, m);
      fn(b, blk, j0, len, static_cast<const scalar_t*>(m));
    }
  });
}

}  // namespace cpu
}  // namespace curvkern
