// Host-side launchers of the CUDA kernels (defined in csrc/cuda/<op>.cu, instantiated for float
// and double). Pointers are to contiguous device memory; shapes are in the comments. Each
// launcher enqueues on `stream` and returns without synchronizing; the caller checks the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace curvkern {
namespace cuda {

template <typename scalar_t>
void launch_perturb(const scalar_t* x,   // (B, D)
                    const int64_t* ids,  // (B,)
                    scalar_t* out,       // (n, B, D)
                    uint64_t seed, int64_t n, int64_t batch, int64_t dim, scalar_t h,
                    int64_t offset, int sm_count, cudaStream_t stream);

template <typename scalar_t>
void launch_perturb_zo(const scalar_t* x,   // (B, D)
                       const int64_t* ids,  // (B,)
                       scalar_t* out,       // (4, n, B, D)
                       uint64_t seed, int64_t n, int64_t batch, int64_t dim, scalar_t h,
                       int64_t offset, int sm_count, cudaStream_t stream);

template <typename scalar_t>
void launch_probe_reduce(const scalar_t* g0,  // (B, D)
                         const scalar_t* g,   // (n, B, D)
                         const int64_t* ids,  // (B,)
                         scalar_t* stats,     // (B, 4)
                         uint64_t seed, int64_t n, int64_t batch, int64_t dim, double h,
                         int64_t offset, cudaStream_t stream);

template <typename scalar_t>
void launch_rademacher(const int64_t* ids,  // (B,)
                       scalar_t* out,       // (n, B, D)
                       uint64_t seed, uint32_t stream_id, int64_t n, int64_t batch, int64_t dim,
                       int64_t offset, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace curvkern
