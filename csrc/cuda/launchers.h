// Host-side launchers of the CUDA kernels (defined in csrc/cuda/<op>.cu, instantiated for float
// and double). Pointers are to contiguous device memory; shapes are in the comments. Each
// launcher enqueues on `stream` and returns without synchronizing; the caller checks the launch.
// `mask` (csrc/mask.h) has null values when the op has no mask.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mask.h"

namespace curvkern {
namespace cuda {

template <typename scalar_t>
void launch_perturb(const scalar_t* x,   // (B, D)
                    const int64_t* ids,  // (B,)
                    scalar_t* out,       // (n, B, D)
                    MaskView<scalar_t> mask, uint64_t seed, int64_t n, int64_t batch, int64_t dim,
                    scalar_t h, int64_t offset, int sm_count, cudaStream_t stream);

template <typename scalar_t>
void launch_perturb_zo(const scalar_t* x,   // (B, D)
                       const int64_t* ids,  // (B,)
                       scalar_t* out,       // (4, n, B, D)
                       MaskView<scalar_t> mask, uint64_t seed, int64_t n, int64_t batch,
                       int64_t dim, scalar_t h, int64_t offset, int sm_count, cudaStream_t stream);

// Elements of a sample reduced by one warp in the first stage of probe_reduce (a fixed number:
// the partial sums, and so the results, depend on D alone, never on B or the launch).
constexpr int64_t kReduceChunkBlocks = 8;
constexpr int64_t kReduceChunk = kReduceChunkBlocks * kProbeBlock;  // 1024 elements

// Chunks per row of D elements: the last dimension of probe_reduce's workspace.
inline int64_t reduce_chunks(int64_t dim) { return (dim + kReduceChunk - 1) / kReduceChunk; }

template <typename scalar_t>
void launch_probe_reduce(const scalar_t* g0,  // (B, D)
                         const scalar_t* g,   // (n, B, D)
                         const int64_t* ids,  // (B,)
                         double* partial,     // (n, B, reduce_chunks(D), 2) workspace
                         double* stats,       // (B, 4)
                         MaskView<scalar_t> mask, uint64_t seed, int64_t n, int64_t batch,
                         int64_t dim, double h, int64_t offset, int sm_count, cudaStream_t stream);

template <typename scalar_t>
void launch_rademacher(const int64_t* ids,  // (B,)
                       scalar_t* out,       // (n, B, D)
                       uint64_t seed, uint32_t stream_id, int64_t n, int64_t batch, int64_t dim,
                       int64_t offset, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace curvkern
