// CUDA implementations of the curvkern ops: argument checks, allocation and dtype dispatch around
// the kernel launchers of csrc/cuda/*.cu.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/launchers.h"
#include "mask.h"

namespace curvkern {
namespace cuda {
namespace {

// SMs of the current device, for the launch configurations. ATen caches the device properties
// (queried once per device per process), so this costs no driver call per op.
int current_sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The mask as the kernels see it (csrc/mask.h); `storage` keeps a contiguous copy alive.
template <typename scalar_t>
MaskView<scalar_t> mask_view(const at::Tensor& storage, int64_t dim) {
  if (!storage.defined()) return MaskView<scalar_t>();
  return MaskView<scalar_t>(storage.data_ptr<scalar_t>(), storage.size(1), dim);
}

at::Tensor contiguous_mask(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? mask->contiguous() : at::Tensor();
}

at::Tensor perturb_cuda(const at::Tensor& x, const at::Tensor& ids, int64_t seed, int64_t n_probes,
                        double h, int64_t probe_offset, const std::optional<at::Tensor>& mask) {
  check_perturb_args(x, ids, seed, n_probes, h, probe_offset, mask, "perturb");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = stacked_like(x, n_probes);
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous(), idc = ids.contiguous(), mc = contiguous_mask(mask);
  const int64_t dim = sample_numel(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "perturb_cuda", [&] {
    launch_perturb<scalar_t>(xc.data_ptr<scalar_t>(), idc.data_ptr<int64_t>(),
                             out.data_ptr<scalar_t>(), mask_view<scalar_t>(mc, dim),
                             static_cast<uint64_t>(seed), n_probes, x.size(0), dim,
                             static_cast<scalar_t>(h), probe_offset, current_sm_count(),
                             c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor perturb_zo_cuda(const at::Tensor& x, const at::Tensor& ids, int64_t seed,
                           int64_t n_probes, double h, int64_t probe_offset,
                           const std::optional<at::Tensor>& mask) {
  check_perturb_args(x, ids, seed, n_probes, h, probe_offset, mask, "perturb_zo");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = stacked_like(x, 4 * n_probes);
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous(), idc = ids.contiguous(), mc = contiguous_mask(mask);
  const int64_t dim = sample_numel(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "perturb_zo_cuda", [&] {
    launch_perturb_zo<scalar_t>(xc.data_ptr<scalar_t>(), idc.data_ptr<int64_t>(),
                                out.data_ptr<scalar_t>(), mask_view<scalar_t>(mc, dim),
                                static_cast<uint64_t>(seed), n_probes, x.size(0), dim,
                                static_cast<scalar_t>(h), probe_offset, current_sm_count(),
                                c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor probe_reduce_cuda(const at::Tensor& g0, const at::Tensor& g, const at::Tensor& ids,
                             int64_t seed, double h, int64_t probe_offset,
                             const std::optional<at::Tensor>& mask) {
  check_probe_reduce_args(g0, g, ids, seed, h, probe_offset, mask);
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t n = g.size(0), batch = g.size(1), dim = g.size(2);
  const auto double_options = g.options().dtype(at::kDouble);
  if (n == 0 || batch == 0) return at::zeros({batch, 4}, double_options);  // sums of no probes
  at::Tensor stats = at::empty({batch, 4}, double_options);  // every element written in stage 2
  // Stage 1's per-chunk sums: 16 bytes per 1024 elements of g, from the caching allocator.
  at::Tensor partial = at::empty({n, batch, reduce_chunks(dim), 2}, double_options);
  const at::Tensor g0c = g0.contiguous(), gc = g.contiguous(), idc = ids.contiguous();
  const at::Tensor mc = contiguous_mask(mask);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "probe_reduce_cuda", [&] {
    launch_probe_reduce<scalar_t>(g0c.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                                  idc.data_ptr<int64_t>(), partial.data_ptr<double>(),
                                  stats.data_ptr<double>(), mask_view<scalar_t>(mc, dim),
                                  static_cast<uint64_t>(seed), n, batch, dim, h, probe_offset,
                                  current_sm_count(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return stats;
}

at::Tensor rademacher_cuda(int64_t seed, const at::Tensor& ids, int64_t n_probes,
                           at::IntArrayRef sample_shape, int64_t probe_offset, int64_t stream,
                           std::optional<at::ScalarType> dtype) {
  const c10::cuda::CUDAGuard guard(ids.device());
  at::Tensor out =
      make_rademacher_output(seed, ids, n_probes, sample_shape, probe_offset, stream, dtype);
  if (out.numel() == 0) return out;
  const at::Tensor idc = ids.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rademacher_cuda", [&] {
    launch_rademacher<scalar_t>(
        idc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), static_cast<uint64_t>(seed),
        static_cast<uint32_t>(stream), n_probes, ids.size(0), c10::multiply_integers(sample_shape),
        probe_offset, current_sm_count(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(curvkern, CUDA, m) {
  m.impl("perturb", &cuda::perturb_cuda);
  m.impl("perturb_zo", &cuda::perturb_zo_cuda);
  m.impl("probe_reduce", &cuda::probe_reduce_cuda);
  m.impl("rademacher", &cuda::rademacher_cuda);
}

}  // namespace curvkern
