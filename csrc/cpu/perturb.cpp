// CPU kernel of curvkern::perturb.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/mask_block.h"
#include "cpu/sign_table.h"
#include "mask.h"
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

// The same with mask weights m: x + (sign * h) * m, which equals the twin's x + (h * m) * r
// bit for bit (sign * h is exact, and rounding is symmetric in the sign).
template <typename scalar_t>
inline void add_masked_step(const scalar_t* __restrict__ x, const scalar_t* __restrict__ sign,
                            scalar_t h, const scalar_t* __restrict__ m,
                            scalar_t* __restrict__ out) {
  for (int i = 0; i < cpu::kSignsPerByte; ++i) out[i] = x[i] + sign[i] * h * m[i];
}

// x + h * m * r for every probe, block by block (cpu::for_each_sample_block).
template <typename scalar_t, bool kMasked>
void perturb_cpu_kernel(const scalar_t* x,   // (B, D)
                        const int64_t* ids,  // (B,)
                        scalar_t* out,       // (n, B, D)
                        MaskView<scalar_t> mask, uint64_t seed, int64_t n, int64_t batch,
                        int64_t dim, scalar_t h, int64_t offset) {
  cpu::for_each_sample_block<scalar_t, kMasked>(
      mask, batch, dim, [=](int64_t b, int64_t blk, int64_t j0, int len, const scalar_t* m) {
        const scalar_t* xb = x + b * dim + j0;
        for (int64_t k = 0; k < n; ++k) {
          const ProbeWords r = probe_block(seed, 0, ids[b], offset + k, blk);
          scalar_t* o = out + (k * batch + b) * dim + j0;
          // Whole bytes of signs through the table, in full and partial blocks alike; the
          // last len % 8 elements of a partial block one by one.
          const int whole = len / cpu::kSignsPerByte;
          for (int byte = 0; byte < whole; ++byte) {
            const int j = byte * cpu::kSignsPerByte;
            const scalar_t* sign = cpu::signs_of_byte<scalar_t>(r, byte);
            if (kMasked) {
              add_masked_step(xb + j, sign, h, m + j, o + j);
            } else {
              add_signed_step(xb + j, sign, h, o + j);
            }
          }
          if (whole * cpu::kSignsPerByte < len) {
            const scalar_t* sign = cpu::signs_of_byte<scalar_t>(r, whole);
            for (int j = whole * cpu::kSignsPerByte; j < len; ++j) {
              const scalar_t step = sign[j - whole * cpu::kSignsPerByte] * h;
              o[j] = xb[j] + (kMasked ? step * m[j] : step);
            }
          }
        }
      });
}

at::Tensor perturb_cpu(const at::Tensor& x, const at::Tensor& ids, int64_t seed, int64_t n_probes,
                       double h, int64_t probe_offset, const std::optional<at::Tensor>& mask) {
  check_perturb_args(x, ids, seed, n_probes, h, probe_offset, mask, "perturb");
  const at::Tensor idc = ids.contiguous();
  check_id_values_cpu(idc, "perturb");
  at::Tensor out = stacked_like(x, n_probes);
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor mc = mask.has_value() ? mask->contiguous() : at::Tensor();
  const int64_t dim = sample_numel(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "perturb_cpu", [&] {
    const scalar_t step = static_cast<scalar_t>(h);
    if (mc.defined()) {
      const MaskView<scalar_t> view(mc.data_ptr<scalar_t>(), mc.size(1), dim);
      perturb_cpu_kernel<scalar_t, true>(
          xc.data_ptr<scalar_t>(), idc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), view,
          static_cast<uint64_t>(seed), n_probes, x.size(0), dim, step, probe_offset);
    } else {
      perturb_cpu_kernel<scalar_t, false>(xc.data_ptr<scalar_t>(), idc.data_ptr<int64_t>(),
                                          out.data_ptr<scalar_t>(), MaskView<scalar_t>(),
                                          static_cast<uint64_t>(seed), n_probes, x.size(0), dim,
                                          step, probe_offset);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(curvkern, CPU, m) { m.impl("perturb", &perturb_cpu); }

}  // namespace curvkern
