// The curvkern operator library: every schema is defined here, once. csrc/cpu/*.cpp and
// csrc/cuda/*.cu only add implementations (TORCH_LIBRARY_IMPL); the dispatcher picks the device.
#include <Python.h>
#include <torch/library.h>

#include "cpu/pass_memory.h"

#ifdef CURVKERN_WITH_CUDA
#include <cuda.h>
#endif

extern "C" {
// An empty module named _C, so that `import curvkern._C` loads this library and thereby runs the
// registrations below. The ops themselves are reached through torch.ops.curvkern.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // documentation
      -1,       // per-interpreter state: none
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace curvkern {

// CUDA version the kernels were compiled with (e.g. 13000), or -1 for a CPU-only build.
int64_t cuda_version() {
#ifdef CURVKERN_WITH_CUDA
  return CUDA_VERSION;
#else
  return -1;
#endif
}

TORCH_LIBRARY(curvkern, m) {
  // Probe masks (perturb, perturb_zo, probe_reduce): mask is None or (B, P) of the data's dtype,
  // P dividing the D elements of a sample; element j of sample b is weighted by
  // mask[b, j / (D / P)] (m below; 1 without a mask).
  //
  // x (B, ...) -> (n_probes * B, ...);
  // row k * B + b = x[b] + h * m[b] * r(seed, ids[b], probe_offset + k)
  m.def(
      "perturb(Tensor x, Tensor ids, int seed, int n_probes, float h, int probe_offset=0, "
      "Tensor? mask=None) -> Tensor");
  // x (B, ...) -> (4 * n_probes * B, ...); row (c * n_probes + k) * B + b =
  // x[b] + h * m * (+-r_k) + h * m * (+-s_k), signs (+,+), (-,+), (+,-), (-,-) for c = 0..3,
  // where r is stream 0 and s stream 1 of the probe generator.
  m.def(
      "perturb_zo(Tensor x, Tensor ids, int seed, int n_probes, float h, int probe_offset=0, "
      "Tensor? mask=None) -> Tensor");
  // g0 (B, D), g (n, B, D) -> (B, 4) float64: sums over probes k of ||dg_k|| / h,
  // ||dg_k||^2 / h^2, (m r_k) . dg_k / h and ((m r_k) . dg_k / h)^2, where dg_k = m (g[k] - g0),
  // the difference taken in g's dtype, everything after it in float64.
  m.def(
      "probe_reduce(Tensor g0, Tensor g, Tensor ids, int seed, float h, int probe_offset=0, "
      "Tensor? mask=None) -> Tensor");
  // -> (n_probes, B, *sample_shape) of +-1
  m.def(
      "rademacher(int seed, Tensor ids, int n_probes, int[] sample_shape, int probe_offset=0, "
      "int stream=0, ScalarType? dtype=None) -> Tensor");
  m.def("cuda_version() -> int", &cuda_version);
  // The pool for the CPU memory of the scorer's passes (csrc/cpu/pass_memory.cpp).
  m.def("pool_enter(int keep_bytes) -> bool", &cpu::pool_enter);
  m.def("pool_exit() -> ()", &cpu::pool_exit);
  m.def("pool_release() -> int", &cpu::pool_release);
  m.def("pool_stats() -> int[]", &cpu::pool_stats);
}

}  // namespace curvkern
