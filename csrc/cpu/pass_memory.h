// The pool for the CPU memory of the scorer's passes (pass_memory.cpp says why and how).
#pragma once

#include <cstdint>
#include <vector>

namespace curvkern::cpu {

// Opens a scoring scope on this thread, keeping at most keep_bytes of freed blocks; false (and
// no scope) where another CPU allocator than torch's default is installed.
bool pool_enter(int64_t keep_bytes);
// Closes this thread's innermost scope; the last scope to close trims the pool to keep_bytes.
void pool_exit();
// Frees every cached block; the bytes freed.
int64_t pool_release();
// [cached bytes, cached blocks, hits, misses, installed (0/1), open scopes]
std::vector<int64_t> pool_stats();

}  // namespace curvkern::cpu
