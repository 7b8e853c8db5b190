// CPU kernel of curvkern::rademacher: materialized probes, for references, tests and the
// probe-materializing estimators.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/sign_table.h"
#include "probes.h"

namespace curvkern {
namespace {

template <typename scalar_t>
void rademacher_cpu_kernel(const int64_t* ids,  // (B,)
                           scalar_t* out,       // (n, B, D)
                           uint64_t seed, uint32_t stream, int64_t n, int64_t batch, int64_t dim,
                           int64_t offset) {
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  at::parallel_for(0, n * batch * nblk, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / nblk, blk = item % nblk;
      const int64_t k = row / batch, b = row % batch;
      const ProbeWords r = probe_block(seed, stream, ids[b], offset + k, blk);
      const int64_t j0 = blk * kProbeBlock;
      const int len = static_cast<int>(std::min(kProbeBlock, dim - j0));
      scalar_t* o = out + row * dim + j0;
      cpu::block_signs(r, len, o);
    }
  });
}

at::Tensor rademacher_cpu(int64_t seed, const at::Tensor& ids, int64_t n_probes,
                          at::IntArrayRef sample_shape, int64_t probe_offset, int64_t stream,
                          std::optional<at::ScalarType> dtype) {
  at::Tensor out =
      make_rademacher_output(seed, ids, n_probes, sample_shape, probe_offset, stream, dtype);
  const at::Tensor idc = ids.contiguous();
  check_id_values_cpu(idc, "rademacher");
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rademacher_cpu", [&] {
    rademacher_cpu_kernel<scalar_t>(idc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                                    static_cast<uint64_t>(seed), static_cast<uint32_t>(stream),
                                    n_probes, ids.size(0), c10::multiply_integers(sample_shape),
                                    probe_offset);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(curvkern, CPU, m) { m.impl("rademacher", &rademacher_cpu); }

}  // namespace curvkern
