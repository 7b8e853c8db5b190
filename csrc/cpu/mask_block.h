// Probe-mask weights of one probe block, for the CPU kernels.
#pragma once

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

}  // namespace cpu
}  // namespace curvkern
