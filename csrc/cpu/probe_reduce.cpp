// CPU kernel of curvkern::probe_reduce: per-sample probe statistics in one pass over g.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common.h"
#include "cpu/sign_table.h"
#include "probes.h"

namespace curvkern {
namespace {

// Pass 1, one work item per row (k, b): ||dg|| / h and r . dg / h. The probe block's signs are
// expanded into a small array through the sign table, and the sums over a block are an OpenMP
// simd reduction, which allows the compiler to reorder them into vector lanes: a row's result
// depends on D alone, not on the batch it is in or the number of threads.
template <typename scalar_t>
void row_norms_cpu(const scalar_t* g0,  // (B, D)
                   const scalar_t* g,   // (n, B, D)
                   const int64_t* ids,  // (B,)
                   double* partial,     // (n, B, 2)
                   uint64_t seed, int64_t n, int64_t batch, int64_t dim, double h, int64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, n * batch, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t sign[kProbeBlock];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t k = row / batch, b = row % batch;
      const scalar_t* gr = g + row * dim;
      const scalar_t* g0r = g0 + b * dim;
      double sq_sum = 0, rd_sum = 0;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const ProbeWords r = probe_block(seed, 0, ids[b], offset + k, blk);
        for (int byte = 0; byte < cpu::kBytesPerBlock; ++byte) {
          const acc_t* eight = cpu::signs_of_byte<acc_t>(r, byte);
          std::copy(eight, eight + cpu::kSignsPerByte, sign + byte * cpu::kSignsPerByte);
        }
        const int64_t j0 = blk * kProbeBlock;
        const int len = static_cast<int>(std::min(kProbeBlock, dim - j0));
        const scalar_t* gb = gr + j0;
        const scalar_t* g0b = g0r + j0;
        acc_t sq = 0, rd = 0;
#pragma omp simd reduction(+ : sq, rd)
        for (int j = 0; j < len; ++j) {
          const acc_t d = static_cast<acc_t>(gb[j]) - static_cast<acc_t>(g0b[j]);
          sq += d * d;
          rd += sign[j] * d;
        }
        sq_sum += sq;
        rd_sum += rd;
      }
      partial[2 * row] = std::sqrt(sq_sum) / h;
      partial[2 * row + 1] = rd_sum / h;
    }
  });
}

// Pass 2, one work item per sample: sums over probes, in probe order.
template <typename scalar_t>
void sum_over_probes_cpu(const double* partial,  // (n, B, 2)
                         scalar_t* stats,        // (B, 4)
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
      for (int i = 0; i < 4; ++i) stats[4 * b + i] = static_cast<scalar_t>(s[i]);
    }
  });
}

at::Tensor probe_reduce_cpu(const at::Tensor& g0, const at::Tensor& g, const at::Tensor& ids,
                            int64_t seed, double h, int64_t probe_offset) {
  check_probe_reduce_args(g0, g, ids, seed, h, probe_offset);
  const at::Tensor idc = ids.contiguous();
  check_id_values_cpu(idc, "probe_reduce");
  const int64_t n = g.size(0), batch = g.size(1), dim = g.size(2);
  at::Tensor stats = at::zeros({batch, 4}, g.options());
  if (n == 0 || batch == 0) return stats;
  const at::Tensor g0c = g0.contiguous(), gc = g.contiguous();
  at::Tensor partial = at::empty({n, batch, 2}, g.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "probe_reduce_cpu", [&] {
    row_norms_cpu<scalar_t>(g0c.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                            idc.data_ptr<int64_t>(), partial.data_ptr<double>(),
                            static_cast<uint64_t>(seed), n, batch, dim, h, probe_offset);
    sum_over_probes_cpu<scalar_t>(partial.data_ptr<double>(), stats.data_ptr<scalar_t>(), n, batch);
  });
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(curvkern, CPU, m) { m.impl("probe_reduce", &probe_reduce_cpu); }

}  // namespace curvkern
