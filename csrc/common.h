// Argument checks and shape helpers shared by the CPU and CUDA implementations. The Python wrappers
// in curvkern/ops.py and their register_fake functions repeat them with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>

#include <cmath>
#include <optional>
#include <vector>

#include "probes.h"

namespace curvkern {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "curvkern::", op,
              ": ", name, " must be float32 or float64, got ", t.scalar_type());
}

// ids: (B,) int64 on the device of `like`. Their values (in [0, 2^56): outside it, probes of
// different samples or streams coincide) are checked by the kernels themselves: the CPU ops with
// check_id_values_cpu before they start, the CUDA kernels with a device-side assertion where they
// read an id (asynchronous: no synchronization with the host, so CUDA graphs still capture them).
inline void check_ids(const at::Tensor& ids, int64_t batch, const at::Tensor& like, const char* op,
                      const char* like_name) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, "curvkern::", op, ": ids must be int64, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == batch, "curvkern::", op,
              ": ids must have shape (B,) with B = ", batch, " (the batch size of ", like_name,
              "), got ", ids.sizes());
  TORCH_CHECK(ids.device() == like.device(), "curvkern::", op, ": ids must be on ", like.device(),
              " like ", like_name, ", got ", ids.device());
}

inline void check_probe_range(int64_t seed, int64_t n_probes, int64_t probe_offset,
                              const char* op) {
  TORCH_CHECK(seed >= 0, "curvkern::", op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK(n_probes >= 0, "curvkern::", op, ": n_probes must be >= 0, got ", n_probes);
  TORCH_CHECK(probe_offset >= 0 && probe_offset + n_probes <= kMaxProbe, "curvkern::", op,
              ": probe indices probe_offset .. probe_offset + n_probes - 1 must lie in [0, 2^32), "
              "got probe_offset = ",
              probe_offset, ", n_probes = ", n_probes);
}

inline void check_sample_size(int64_t numel_per_sample, const char* op) {
  TORCH_CHECK(numel_per_sample < (kMaxProbe << kProbeBlockShift), "curvkern::", op,
              ": a sample may have at most 2^39 elements, got ", numel_per_sample);
}

inline void check_step(double h, const char* op) {
  TORCH_CHECK(std::isfinite(h), "curvkern::", op, ": h must be finite, got ", h);
}

// mask: None, or (B, P) of the dtype and device of `like`, P dividing the D elements of a sample
// (D == 0 takes any P). The messages are those of curvkern/torch_ops.py's _mask_problem.
inline void check_mask(const std::optional<at::Tensor>& mask, int64_t batch, int64_t dim,
                       const at::Tensor& like, const char* op) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.dim() == 2 && m.size(0) == batch, "curvkern::", op,
              ": mask must have shape (B, P) with B = ", batch, ", got ", m.sizes());
  const int64_t parts = m.size(1);
  TORCH_CHECK(parts == 0 ? dim == 0 : dim % parts == 0, "curvkern::", op,
              ": mask must have shape (B, P) with P dividing the ", dim,
              " elements of a sample, got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == like.scalar_type(), "curvkern::", op, ": mask must have dtype ",
              like.scalar_type(), ", got ", m.scalar_type());
  TORCH_CHECK(m.device() == like.device(), "curvkern::", op, ": mask must be on ", like.device(),
              ", got ", m.device());
}

// Arguments of perturb and perturb_zo.
inline void check_perturb_args(const at::Tensor& x, const at::Tensor& ids, int64_t seed,
                               int64_t n_probes, double h, int64_t probe_offset,
                               const std::optional<at::Tensor>& mask, const char* op) {
  TORCH_CHECK(x.dim() >= 1, "curvkern::", op, ": x must have shape (B, ...), got a 0-d tensor");
  check_floating(x, op, "x");
  check_ids(ids, x.size(0), x, op, "x");
  check_probe_range(seed, n_probes, probe_offset, op);
  check_step(h, op);
  const int64_t dim = c10::multiply_integers(x.sizes().slice(1));
  check_sample_size(dim, op);
  check_mask(mask, x.size(0), dim, x, op);
}

// Arguments of probe_reduce: g0 (B, D), g (n, B, D), ids (B,).
inline void check_probe_reduce_args(const at::Tensor& g0, const at::Tensor& g,
                                    const at::Tensor& ids, int64_t seed, double h,
                                    int64_t probe_offset, const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "probe_reduce";
  check_floating(g, op, "g");
  TORCH_CHECK(g.dim() == 3, "curvkern::probe_reduce: g must have shape (n_probes, B, D), got ",
              g.sizes());
  TORCH_CHECK(g0.dim() == 2 && g0.size(0) == g.size(1) && g0.size(1) == g.size(2),
              "curvkern::probe_reduce: g0 must have shape (B, D) = (", g.size(1), ", ", g.size(2),
              ") to match g, got ", g0.sizes());
  TORCH_CHECK(g0.scalar_type() == g.scalar_type(),
              "curvkern::probe_reduce: g0 must have the "
              "dtype of g (",
              g.scalar_type(), "), got ", g0.scalar_type());
  TORCH_CHECK(g0.device() == g.device(), "curvkern::probe_reduce: g0 must be on ", g.device(),
              " like g, got ", g0.device());
  check_ids(ids, g.size(1), g, op, "g");
  check_probe_range(seed, g.size(0), probe_offset, op);
  TORCH_CHECK(std::isfinite(h) && h > 0,
              "curvkern::probe_reduce: h must be positive and finite, "
              "got ",
              h);
  check_sample_size(g.size(2), op);
  check_mask(mask, g.size(1), g.size(2), g, op);
}

// Checks the arguments of rademacher and returns its empty output, (n, B, *sample_shape).
inline at::Tensor make_rademacher_output(int64_t seed, const at::Tensor& ids, int64_t n_probes,
                                         at::IntArrayRef sample_shape, int64_t probe_offset,
                                         int64_t stream, std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "rademacher";
  TORCH_CHECK(ids.dim() == 1, "curvkern::rademacher: ids must have shape (B,), got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "curvkern::rademacher: ids must be int64, got ",
              ids.scalar_type());
  check_probe_range(seed, n_probes, probe_offset, op);
  TORCH_CHECK(stream >= 0 && stream < kMaxStream,
              "curvkern::rademacher: stream must lie in "
              "[0, 256), got ",
              stream);
  for (const int64_t s : sample_shape) {
    TORCH_CHECK(s >= 0, "curvkern::rademacher: sample_shape must be non-negative, got ",
                sample_shape);
  }
  check_sample_size(c10::multiply_integers(sample_shape), op);
  const at::ScalarType st = dtype.value_or(at::kFloat);
  TORCH_CHECK(st == at::kFloat || st == at::kDouble,
              "curvkern::rademacher: dtype must be "
              "float32 or float64, got ",
              st);
  std::vector<int64_t> shape{n_probes, ids.size(0)};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  return at::empty(shape, ids.options().dtype(st));
}

// Ids are checked here on the CPU, where reading them costs nothing (on CUDA: in the kernels).
inline void check_id_values_cpu(const at::Tensor& ids, const char* op) {
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < ids.numel(); ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] < kMaxId, "curvkern::", op,
                ": ids must lie in [0, 2^56), got ids[", b, "] = ", p[b]);
  }
}

// Elements per sample of a (B, ...) tensor: the product of all but the first dimension.
inline int64_t sample_numel(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().slice(1));
}

// An empty (copies * B, ...) tensor for x of shape (B, ...): the stacked perturbed copies.
inline at::Tensor stacked_like(const at::Tensor& x, int64_t copies) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] *= copies;
  return at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace curvkern
