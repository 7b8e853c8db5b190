// Rademacher probes as a pure function of (seed, stream, sample id, probe index, element index).
//
// This header is compiled into both the CPU and the CUDA kernels, so the two devices see
// bit-identical probes. Nothing is ever stored: every kernel regenerates the probe elements it
// needs, 128 at a time, from one call of the counter-based generator Philox-4x32-10
// (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
//
// Layout of one generator call (the "probe block"):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (block, probe, id & 0xffffffff, (id >> 32) | stream << 24)
// where block = element >> 7. Element j of the block is bit (j & 31) of output word (j >> 5);
// a set bit is -1, a clear bit +1. The Python twin (curvkern/torch_ops.py) implements exactly this.
//
// Ranges that keep counters distinct: 0 <= id < 2^56, 0 <= stream < 256, 0 <= probe < 2^32,
// elements per sample < 2^39.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CURVKERN_HD __host__ __device__ __forceinline__
#else
#define CURVKERN_HD inline
#endif

namespace curvkern {

constexpr int kProbeBlockShift = 7;
constexpr int64_t kProbeBlock = int64_t{1} << kProbeBlockShift;  // elements per generator call
constexpr int64_t kMaxId = int64_t{1} << 56;
constexpr int64_t kMaxStream = 256;
constexpr int64_t kMaxProbe = int64_t{1} << 32;

// 128 random bits: one Philox-4x32 output.
struct ProbeWords {
  uint32_t w[4];
};

CURVKERN_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox-4x32 with 10 rounds, as in Random123 (checked against its known-answer vectors).
CURVKERN_HD ProbeWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                     uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c0, hi0, lo0);
    mulhilo32(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return ProbeWords{{c0, c1, c2, c3}};
}

// The 128 probe signs of elements [block * 128, block * 128 + 128) of probe `probe` of sample
// `id`, as bits.
CURVKERN_HD ProbeWords probe_block(uint64_t seed, uint32_t stream, uint64_t id, uint64_t probe,
                                   uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(probe),
                       static_cast<uint32_t>(id), static_cast<uint32_t>(id >> 32) | (stream << 24),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Sign of bit `bit` (0..31) of `word`: +1 when clear, -1 when set.
template <typename T>
CURVKERN_HD T probe_sign(uint32_t word, int bit) {
  return ((word >> bit) & 1u) ? T(-1) : T(1);
}

// Sign of element j (0..127) of a probe block. Indexes the words with a run-time value: for
// host code; device code selects words with compile-time indices (see csrc/cuda/helpers.cuh).
template <typename T>
inline T probe_sign_at(const ProbeWords& words, int j) {
  return probe_sign<T>(words.w[(j >> 5) & 3], j & 31);
}

}  // namespace curvkern
