// CPU kernel of curvkern::perturb_zo: the four perturbed copies of the zeroth-order estimator.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/mask_block.h"
#include "mask.h"
#include "probes.h"

namespace curvkern {
namespace {

// The four copies x +- h r +- h s of one probe pair, added in the order the Python twin uses:
// (x + h * (+-r)) + h * (+-s); with a mask, h * r and h * s are weighted by m.
template <typename scalar_t, bool kMasked>
void perturb_zo_cpu_kernel(const scalar_t* x,   // (B, D)
                           const int64_t* ids,  // (B,)
                           scalar_t* out,       // (4, n, B, D)
                           MaskView<scalar_t> mask, uint64_t seed, int64_t n, int64_t batch,
                           int64_t dim, scalar_t h, int64_t offset) {
  const int64_t copy_stride = n * batch * dim;
  cpu::for_each_sample_block<scalar_t, kMasked>(
      mask, batch, dim, [&](int64_t b, int64_t blk, int64_t j0, int len, const scalar_t* m) {
        const scalar_t* xb = x + b * dim + j0;
        for (int64_t k = 0; k < n; ++k) {
          const ProbeWords r = probe_block(seed, 0, ids[b], offset + k, blk);
          const ProbeWords s = probe_block(seed, 1, ids[b], offset + k, blk);
          scalar_t* o = out + (k * batch + b) * dim + j0;
          for (int j = 0; j < len; ++j) {
            scalar_t hr = probe_sign_at<scalar_t>(r, j) * h;
            scalar_t hs = probe_sign_at<scalar_t>(s, j) * h;
            if (kMasked) {
              hr *= m[j];
              hs *= m[j];
            }
            const scalar_t plus = xb[j] + hr, minus = xb[j] - hr;
            o[j] = plus + hs;
            o[copy_stride + j] = minus + hs;
            o[2 * copy_stride + j] = plus - hs;
            o[3 * copy_stride + j] = minus - hs;
          }
        }
      });
}

at::Tensor perturb_zo_cpu(const at::Tensor& x, const at::Tensor& ids, int64_t seed,
                          int64_t n_probes, double h, int64_t probe_offset,
                          const std::optional<at::Tensor>& mask) {
  check_perturb_args(x, ids, seed, n_probes, h, probe_offset, mask, "perturb_zo");
  const at::Tensor idc = ids.contiguous();
  check_id_values_cpu(idc, "perturb_zo");
  at::Tensor out = stacked_like(x, 4 * n_probes);
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor mc = mask.has_value() ? mask->contiguous() : at::Tensor();
  const int64_t dim = sample_numel(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "perturb_zo_cpu", [&] {
    const scalar_t step = static_cast<scalar_t>(h);
    if (mc.defined()) {
      const MaskView<scalar_t> view(mc.data_ptr<scalar_t>(), mc.size(1), dim);
      perturb_zo_cpu_kernel<scalar_t, true>(
          xc.data_ptr<scalar_t>(), idc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), view,
          static_cast<uint64_t>(seed), n_probes, x.size(0), dim, step, probe_offset);
    } else {
      perturb_zo_cpu_kernel<scalar_t, false>(xc.data_ptr<scalar_t>(), idc.data_ptr<int64_t>(),
                                             out.data_ptr<scalar_t>(), MaskView<scalar_t>(),
                                             static_cast<uint64_t>(seed), n_probes, x.size(0), dim,
                                             step, probe_offset);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(curvkern, CPU, m) { m.impl("perturb_zo", &perturb_zo_cpu); }

}  // namespace curvkern
