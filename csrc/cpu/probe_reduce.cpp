// CPU kernel of curvkern::probe_reduce: per-sample probe statistics in one pass over g.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.h"
#include "cpu/mask_block.h"
#include "cpu/sign_table.h"
#include "mask.h"
#include "probes.h"

namespace curvkern {
namespace {

// Pass 1, one work item per row (k, b): ||dg|| / h and r . dg / h, with dg = m * (g - g0). The
// difference is taken in the input dtype (as the twin does). The standard error of the
// statistics comes from sums of c and c^2 that cancel, so per-row values need more precision
// than float32 sums give: the sums over one 128-element probe block are in the
// input's precision (a float32 sum of 128 terms in any order is within 127 * 2^-24 = 7.6e-6 of
// exact, relative to the sum of magnitudes), and the sums of blocks, the rows' c and t and the
// sums over probes are in double. Summing each element in double instead costs 35-60% more CPU
// time (measured at D = 3072 and 150,528), for errors already far below the input's rounding.
// The probe block's signs are expanded into a small array through the sign table, and the sums
// over a block are an OpenMP simd reduction, which allows the compiler to reorder them into
// vector lanes: a row's result depends on D alone, not on the batch it is in or the number of
// threads.
//
// Float32 squares leave float32's range where the differences are tiny or huge: a fitted
// sample's gradient can be 1e-24 (its softmax saturated), and d^2 < 2^-126 is subnormal, below
// 2^-149 zero. A block whose float32 sum of squares is below 2^-100 or above 2^120 (or not
// finite) is summed again in double. Above 2^-100, what subnormal products and sums can lose
// (at most 2^-150 each, 2 * 128 of them: 2^-142) is 2^-42 of the sum, far below its rounding.
constexpr float kFloatSquaresLow = 0x1p-100f;
constexpr float kFloatSquaresHigh = 0x1p120f;

// A block's sum of d^2 and of (m r) . d in double (the out-of-range fallback); ``weight`` is
// null for a block weighted as a whole.
template <typename scalar_t, typename acc_t>
void block_sums_double(const scalar_t* gb, const scalar_t* g0b, const acc_t* sign,
                       const acc_t* weight, int len, double* sq, double* rd) {
  double s = 0, r = 0;
  for (int j = 0; j < len; ++j) {
    double d = static_cast<double>(static_cast<scalar_t>(gb[j] - g0b[j]));
    if (weight != nullptr) d = weight[j] != 0 ? d * static_cast<double>(weight[j]) : 0.0;
    s += d * d;
    r += static_cast<double>(sign[j]) * d;
  }
  *sq = s;
  *rd = r;
}

template <typename scalar_t, bool kMasked>
void row_norms_cpu(const scalar_t* g0,  // (B, D)
                   const scalar_t* g,   // (n, B, D)
                   const int64_t* ids,  // (B,)
                   double* partial,     // (n, B, 2)
                   MaskView<scalar_t> mask, uint64_t seed, int64_t n, int64_t batch, int64_t dim,
                   double h, int64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, n * batch, grain, [=](int64_t begin, int64_t end) {
    alignas(64) acc_t sign[kProbeBlock];    // (128,) m * r of the block
    alignas(64) acc_t weight[kProbeBlock];  // (128,) m of the block
    // (k, b) of the row, stepped along with it: a 64-bit division per row costs as much as
    // the arithmetic of a 64-element row.
    int64_t k = begin / batch, b = begin % batch;
    for (int64_t row = begin; row < end; ++row, b = b + 1 == batch ? (++k, 0) : b + 1) {
      const scalar_t* gr = g + row * dim;
      const scalar_t* g0r = g0 + b * dim;
      double sq_sum = 0, rd_sum = 0;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t j0 = blk * kProbeBlock;
        const int len = static_cast<int>(std::min(kProbeBlock, dim - j0));
        // A block inside one run of the mask is weighted as a whole: (m r) . (m dg) = m^2 r . dg
        // and ||m dg||^2 = m^2 ||dg||^2; a masked-out block is not read. A masked-out element
        // never contributes, a NaN there included (csrc/mask.h): skipped here, selected away
        // (not multiplied by 0) in a block with several weights.
        scalar_t run_weight = 1;
        const bool per_element = kMasked && !cpu::block_in_one_run(mask, b, j0, len, &run_weight);
        if (kMasked && !per_element && run_weight == scalar_t(0)) continue;
        const ProbeWords r = probe_block(seed, 0, ids[b], offset + k, blk);
        // The bytes holding the block's len signs (a short row's block is partial).
        const int bytes = (len + cpu::kSignsPerByte - 1) / cpu::kSignsPerByte;
        for (int byte = 0; byte < bytes; ++byte) {
          const acc_t* eight = cpu::signs_of_byte<acc_t>(r, byte);
          std::copy(eight, eight + cpu::kSignsPerByte, sign + byte * cpu::kSignsPerByte);
        }
        const scalar_t* gb = gr + j0;
        const scalar_t* g0b = g0r + j0;
        acc_t sq = 0, rd = 0;
        if (per_element) {
          cpu::block_weights(mask, b, j0, len, weight);
          for (int j = 0; j < len; ++j) sign[j] *= weight[j];
#pragma omp simd reduction(+ : sq, rd)
          for (int j = 0; j < len; ++j) {
            const acc_t diff = static_cast<acc_t>(static_cast<scalar_t>(gb[j] - g0b[j]));
            const acc_t d = weight[j] != acc_t(0) ? diff * weight[j] : acc_t(0);
            sq += d * d;
            rd += sign[j] * d;
          }
        } else {
#pragma omp simd reduction(+ : sq, rd)
          for (int j = 0; j < len; ++j) {
            const acc_t d = static_cast<acc_t>(static_cast<scalar_t>(gb[j] - g0b[j]));
            sq += d * d;
            rd += sign[j] * d;
          }
        }
        double sq_block = static_cast<double>(sq), rd_block = static_cast<double>(rd);
        if constexpr (std::is_same_v<acc_t, float>) {
          if (!(sq >= kFloatSquaresLow && sq <= kFloatSquaresHigh)) {
            block_sums_double(gb, g0b, sign, per_element ? weight : nullptr, len, &sq_block,
                              &rd_block);
          }
        }
        const double scale = static_cast<double>(run_weight) * static_cast<double>(run_weight);
        sq_sum += scale * sq_block;
        rd_sum += scale * rd_block;
      }
      partial[2 * row] = std::sqrt(sq_sum) / h;
      partial[2 * row + 1] = rd_sum / h;
    }
  });
}

// Pass 2, one work item per sample: sums over probes, in probe order.
void sum_over_probes_cpu(const double* partial,  // (n, B, 2)
                         double* stats,          // (B, 4)
                         int64_t n, int64_t batch) {
  at::parallel_for(0, batch, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double s[4] = {};
      for (int64_t k = 0; k < n; ++k) {
        const double c = partial[2 * (k * batch + b)], t = partial[2 * (k * batch + b) + 1];
        s[0] += c;
        s[1] += c * c;
        s[2] += t;
        s[3] += t * t;
      }
      for (int i = 0; i < 4; ++i) stats[4 * b + i] = s[i];
    }
  });
}

at::Tensor probe_reduce_cpu(const at::Tensor& g0, const at::Tensor& g, const at::Tensor& ids,
                            int64_t seed, double h, int64_t probe_offset,
                            const std::optional<at::Tensor>& mask) {
  check_probe_reduce_args(g0, g, ids, seed, h, probe_offset, mask);
  const at::Tensor idc = ids.contiguous();
  check_id_values_cpu(idc, "probe_reduce");
  const int64_t n = g.size(0), batch = g.size(1), dim = g.size(2);
  const auto stats_options = g.options().dtype(at::kDouble);
  if (n == 0 || batch == 0) return at::zeros({batch, 4}, stats_options);  // sums of no probes
  at::Tensor stats = at::empty({batch, 4}, stats_options);  // every element written in pass 2
  const at::Tensor g0c = g0.contiguous(), gc = g.contiguous();
  const at::Tensor mc = mask.has_value() ? mask->contiguous() : at::Tensor();
  at::Tensor partial = at::empty({n, batch, 2}, stats_options);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "probe_reduce_cpu", [&] {
    if (mc.defined()) {
      const MaskView<scalar_t> view(mc.data_ptr<scalar_t>(), mc.size(1), dim);
      row_norms_cpu<scalar_t, true>(g0c.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                                    idc.data_ptr<int64_t>(), partial.data_ptr<double>(), view,
                                    static_cast<uint64_t>(seed), n, batch, dim, h, probe_offset);
    } else {
      row_norms_cpu<scalar_t, false>(g0c.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                                     idc.data_ptr<int64_t>(), partial.data_ptr<double>(),
                                     MaskView<scalar_t>(), static_cast<uint64_t>(seed), n, batch,
                                     dim, h, probe_offset);
    }
  });
  sum_over_probes_cpu(partial.data_ptr<double>(), stats.data_ptr<double>(), n, batch);
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(curvkern, CPU, m) { m.impl("probe_reduce", &probe_reduce_cpu); }

}  // namespace curvkern
