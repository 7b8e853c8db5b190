// The CPU memory of the scorer's passes: a pool that keeps the blocks a pass frees for the next.
//
// Why: on the CPU, torch allocates with posix_memalign and frees with free. glibc hands a block
// above its mmap threshold back to the system on free, and trims the top of its heap once more
// than its trim threshold is free there; both thresholds start at 128 KiB and 256 KiB and grow
// only as large blocks are freed. A scoring pass allocates the same activations as the previous
// pass, so with the defaults every pass faults its pages back in, one 4 KiB page at a time (an
// MLP on 64 features, 2,816 rows a call: about 2,000 page faults a call, half as much time as
// the passes themselves; docs/method.md, "The CPU pass size"). CUDA's caching allocator keeps
// its blocks; this is the same idea for the scorer's CPU passes only.
//
// How: the allocator below wraps torch's CPU allocator. On a thread inside a scoring scope
// (pool_enter .. pool_exit), a request of at least kMinBytes, rounded up to whole pages, is
// served from the smallest free block in the pool of at least that size and at most twice it
// (a pass of fewer rows takes a longer pass's blocks), or newly allocated; everything else, on
// every other thread and outside the scopes, goes to the wrapped allocator unchanged. A pooled
// block freed while any thread is scoring goes back to the pool; one freed when nobody is
// (a result the caller kept) goes back to the system. The pool keeps at most `keep` bytes
// (least recently freed blocks go first); when the last scope ends it is trimmed to that.
// pool_release() empties it.
//
// The wrapper is installed on the first scope, at the default priority, only if torch's CPU
// allocator is then still its own default: an allocator somebody else installed is left alone,
// and the scorer runs without the pool.
#include "cpu/pass_memory.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace curvkern::cpu {
namespace {

// Smaller requests come from glibc's heap free lists, which do not fault once warm.
constexpr size_t kMinBytes = size_t{64} << 10;
constexpr size_t kPage = size_t{4} << 10;

thread_local int64_t t_depth = 0;  // this thread's nesting of scopes

class PassPool final : public c10::Allocator {
 public:
  static PassPool& self();

  c10::DataPtr allocate(size_t nbytes) override {
    if (t_depth == 0 || nbytes < kMinBytes) {
      return base_->allocate(nbytes);
    }
    const size_t size = (nbytes + kPage - 1) / kPage * kPage;
    void* data = take(size);
    if (data == nullptr) {
      data = c10::alloc_cpu(size);  // throws torch's own out-of-memory error
      std::lock_guard<std::mutex> lock(mutex_);
      sizes_.emplace(data, size);
      ++misses_;
    }
    // What torch's default CPU allocator reports, so that torch.profiler's memory view and
    // the caffe2_report_cpu_memory_usage flag see the same allocations as without the pool.
    c10::profiledCPUMemoryReporter().New(data, nbytes);
    // A simple data pointer (context == data), as the default allocator's: torch's copy-on-write
    // storage takes only those.
    return {data, data, &PassPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  // oneDNN's scratch memory comes from raw_allocate and goes back through raw_deleter(), for
  // blocks of either origin: release() tells its own from the wrapped allocator's.
  c10::DeleterFnPtr raw_deleter() const override { return &PassPool::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Installs the pool as torch's CPU allocator if nobody has replaced the default; whether the
  // pool is the CPU allocator now.
  bool install() {
    std::call_once(installed_, [this] {
      c10::Allocator* current = c10::GetCPUAllocator();
      if (current == c10::GetDefaultCPUAllocator()) {
        base_ = current;
        c10::SetCPUAllocator(this, /*priority=*/0);
      }
    });
    return c10::GetCPUAllocator() == this;
  }

  bool enter(int64_t keep) {
    TORCH_CHECK(keep >= 0, "pool_enter: keep must be >= 0 bytes, got ", keep);
    if (!install()) {
      return false;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    keep_ = static_cast<size_t>(keep);
    ++active_;
    ++t_depth;
    return true;
  }

  void exit() {
    TORCH_CHECK(t_depth > 0, "pool_exit without a pool_enter that entered on this thread");
    --t_depth;
    std::lock_guard<std::mutex> lock(mutex_);
    if (--active_ == 0) {
      trim_locked(keep_);
    }
  }

  int64_t release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t before = cached_;
    trim_locked(0);
    return static_cast<int64_t>(before);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_),
            static_cast<int64_t>(blocks_.size()),
            hits_,
            misses_,
            c10::GetCPUAllocator() == this ? 1 : 0,
            static_cast<int64_t>(active_)};
  }

 private:
  struct Block {
    void* data;
    size_t size;
  };
  using Lru = std::list<Block>;  // free blocks, least recently freed first

  static void release(void* data) {
    PassPool& pool = self();
    if (!pool.give_back(data)) {
      pool.base_->raw_deleter()(data);  // the wrapped allocator's block (raw_deallocate)
    }
  }

  // The smallest kept block of at least `size` bytes and at most twice that (a pass of fewer
  // rows takes a longer pass's block rather than keeping blocks of its own), or nullptr.
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = by_size_.lower_bound(size);
    if (it == by_size_.end() || it->first > 2 * size) {
      return nullptr;
    }
    Lru::iterator block = it->second;
    by_size_.erase(it);
    void* data = block->data;
    cached_ -= block->size;
    blocks_.erase(block);
    ++hits_;
    return data;
  }

  // Keeps or frees one of the pool's blocks; false for a block the pool did not make.
  bool give_back(void* data) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = sizes_.find(data);
      if (it == sizes_.end()) {
        return false;
      }
      c10::profiledCPUMemoryReporter().Delete(data);
      const size_t size = it->second;
      if (active_ > 0 && size <= keep_) {
        trim_locked(keep_ - size);
        blocks_.push_back(Block{data, size});
        by_size_.emplace(size, std::prev(blocks_.end()));
        cached_ += size;
        return true;
      }
      sizes_.erase(it);
    }
    c10::free_cpu(data);
    return true;
  }

  // Frees the least recently freed blocks until at most `limit` bytes are cached.
  void trim_locked(size_t limit) {
    while (cached_ > limit) {
      Block& oldest = blocks_.front();
      auto range = by_size_.equal_range(oldest.size);
      for (auto it = range.first; it != range.second; ++it) {
        if (it->second == blocks_.begin()) {
          by_size_.erase(it);
          break;
        }
      }
      cached_ -= oldest.size;
      sizes_.erase(oldest.data);
      c10::free_cpu(oldest.data);
      blocks_.pop_front();
    }
  }

  c10::Allocator* base_ = nullptr;
  std::once_flag installed_;
  std::mutex mutex_;
  Lru blocks_;
  std::multimap<size_t, Lru::iterator> by_size_;  // kept blocks by size
  std::unordered_map<void*, size_t> sizes_;       // every block the pool made and has not freed
  size_t cached_ = 0;
  size_t keep_ = 0;
  int64_t active_ = 0;  // scopes open on all threads
  int64_t hits_ = 0;    // requests served from kept blocks
  int64_t misses_ = 0;  // requests newly allocated
};

PassPool& PassPool::self() {
  // Never destroyed: tensors holding pooled blocks may outlive every static destructor.
  static PassPool* pool = new PassPool();
  return *pool;
}

}  // namespace

bool pool_enter(int64_t keep_bytes) { return PassPool::self().enter(keep_bytes); }

void pool_exit() { PassPool::self().exit(); }

int64_t pool_release() { return PassPool::self().release_all(); }

std::vector<int64_t> pool_stats() { return PassPool::self().stats(); }

}  // namespace curvkern::cpu
