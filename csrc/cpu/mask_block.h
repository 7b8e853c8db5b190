// Probe-mask weights of one probe block, for the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "mask.h"
#include "probes.h"

namespace curvkern {
namespace cpu {

// out[0 .. len) = weights of elements j0 .. j0 + len - 1 of sample b. A block inside one run of
// the mask (the usual case: runs of whole rows, channels or token embeddings) is one value; only
// a block that straddles runs is looked up element by element.
template <typename T, typename scalar_t>
inline void block_weights(const MaskView<scalar_t>& mask, int64_t b, int64_t j0, int len, T* out) {
  const int64_t first = mask.position(j0), last = mask.position(j0 + len - 1);
  const scalar_t* row = mask.values + b * mask.parts;
  if (first == last) {
    std::fill(out, out + len, static_cast<T>(row[first]));
  } else {
    for (int j = 0; j < len; ++j) out[j] = static_cast<T>(row[mask.position(j0 + j)]);
  }
}

}  // namespace cpu
}  // namespace curvkern
