// Probe masks: element j of sample b is weighted by mask[b, j / run], where mask is (B, P) and
// run = D / P (a mask over a prefix of the sample shape, broadcast over the rest). The kernels
// weight the probes (x + h * m * r) and the gradient differences (m * (g - g0)) by it.
//
// One rule on every device (CPU and CUDA kernels, the Python twin): an element whose weight is 0
// never contributes to probe_reduce, even when its gradient difference is NaN or infinite (the
// kernels select, m != 0 ? m * d : 0, rather than multiply, since NaN * 0 is NaN). A masked-out
// part of the input is one the caller asked to leave out, so what it holds must not reach the
// scores. Products with the weight are rounded on their own, never fused with the following
// addition (the CUDA kernels use mul_rn, the CPU build compiles with -ffp-contract=off), so that
// a fractional weight gives the same bits on every device.
//
// j / run is computed with a multiply and a shift instead of a 64-bit division (tens of
// instructions on a GPU, per element): the divider below is the one of Granlund & Montgomery
// (as in ATen's IntDivider), exact for numerators and divisors below 2^31. The CPU kernels use
// the same code, so the CPU tests check the arithmetic the GPU runs. Samples of 2^31 elements or
// more fall back to the division.
#pragma once

#include <cstdint>

#include "probes.h"

namespace curvkern {

struct RunDivider {
  uint64_t run = 1;    // elements per mask value, >= 1
  uint32_t magic = 1;  // floor(2^32 * (2^shift - run) / run) + 1, below 2^32
  uint32_t shift = 0;  // ceil(log2(run))
  bool wide = false;   // numerators may reach 2^31: divide

  RunDivider() = default;
  // `run` elements per mask value, for element indices below `dim`.
  RunDivider(int64_t run_, int64_t dim) : run(static_cast<uint64_t>(run_ < 1 ? 1 : run_)) {
    constexpr uint64_t kLimit = uint64_t{1} << 31;
    wide = static_cast<uint64_t>(dim) > kLimit || run > kLimit;
    if (wide) return;
    while ((uint64_t{1} << shift) < run) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - run)) / run + 1);
  }

  // j / run for 0 <= j < dim.
  CURVKERN_HD int64_t operator()(int64_t j) const {
    if (wide) return static_cast<int64_t>(static_cast<uint64_t>(j) / run);
    const uint32_t n = static_cast<uint32_t>(j);
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, magic);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
#endif
    // t <= n < 2^31, so t + n does not overflow 32 bits.
    return static_cast<int64_t>((t + n) >> shift);
  }
};

// A (B, P) mask as the kernels see it: no mask when `values` is null.
template <typename scalar_t>
struct MaskView {
  const scalar_t* values = nullptr;  // (B, P) contiguous, or null
  int64_t parts = 0;                 // P
  RunDivider position;               // element j -> column j / (D / P)

  MaskView() = default;
  MaskView(const scalar_t* values_, int64_t parts_, int64_t dim)
      : values(values_), parts(parts_), position(parts_ > 0 ? dim / parts_ : 1, dim) {}

  // Weight of element j of sample b (values must be set).
  CURVKERN_HD scalar_t at(int64_t b, int64_t j) const { return values[b * parts + position(j)]; }
};

}  // namespace curvkern
