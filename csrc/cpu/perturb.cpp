// CPU kernel of curvkern::perturb.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/sign_table.h"
#include "probes.h"

namespace curvkern {
namespace {

// out[i] = x[i] + sign[i] * h for eight elements. __restrict__ lets the compiler vectorize: the
// output aliases neither input (without it, it emits scalar code).
template <typename scalar_t>
inline void add_signed_step(const scalar_t* __restrict__ x, const scalar_t* __restrict__ sign,
                            scalar_t h, scalar_t* __restrict__ out) {
  for (int i = 0; i < cpu::kSignsPerByte; ++i) out[i] = x[i] + sign[i] * h;
}

// Work items are (sample b, probe block) pairs; each writes that block of every perturbed copy,
// so x is read once and every output element written once.
template <typename scalar_t>
void perturb_cpu_kernel(const scalar_t* x,   // (B, D)
                        const int64_t* ids,  // (B,)
                        scalar_t* out,       // (n, B, D)
                        uint64_t seed, int64_t n, int64_t batch, int64_t dim, scalar_t h,
                        int64_t offset) {
  const int64_t nblk = (dim + kProbeBlock - 1) / kProbeBlock;
  at::parallel_for(0, batch * nblk, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nblk, blk = item % nblk;
      const int64_t j0 = blk * kProbeBlock;
      const int len = static_cast<int>(std::min(kProbeBlock, dim - j0));
      const scalar_t* xb = x + b * dim + j0;
      for (int64_t k = 0; k < n; ++k) {
        const ProbeWords r = probe_block(seed, 0, ids[b], offset + k, blk);
        scalar_t* o = out + (k * batch + b) * dim + j0;
        if (len == kProbeBlock) {
          for (int byte = 0; byte < cpu::kBytesPerBlock; ++byte) {
            const int j = byte * cpu::kSignsPerByte;
            add_signed_step(xb + j, cpu::signs_of_byte<scalar_t>(r, byte), h, o + j);
          }
        } else {
          for (int j = 0; j < len; ++j) o[j] = xb[j] + probe_sign_at<scalar_t>(r, j) * h;
        }
      }
    }
  });
}

at::Tensor perturb_cpu(const at::Tensor& x, const at::Tensor& ids, int64_t seed, int64_t n_probes,
                       double h, int64_t probe_offset) {
  check_perturb_args(x, ids, seed, n_probes, h, probe_offset, "perturb");
  const at::Tensor idc = ids.contiguous();
  check_id_values_cpu(idc, "perturb");
  at::Tensor out = stacked_like(x, n_probes);
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "perturb_cpu", [&] {
    perturb_cpu_kernel<scalar_t>(xc.data_ptr<scalar_t>(), idc.data_ptr<int64_t>(),
                                 out.data_ptr<scalar_t>(), static_cast<uint64_t>(seed), n_probes,
                                 x.size(0), sample_numel(x), static_cast<scalar_t>(h),
                                 probe_offset);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(curvkern, CPU, m) { m.impl("perturb", &perturb_cpu); }

}  // namespace curvkern
